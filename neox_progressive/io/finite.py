"""Refusing non-finite weights (and mixed dtypes): a NaN or Inf in a source checkpoint must not be copied on silently.

A diverged run can save NaN or Inf weights. Expanding or exporting such a checkpoint would hand on
a model that is broken everywhere the value reaches (one NaN in a weight makes every logit NaN).
`guard(reader)` wraps a `CheckpointReader` so that every tensor it hands out is checked, and the
first non-finite one stops the job with a one-line UserError naming the file, the key and the
count. `--allow-nonfinite` (`guard(reader, allow=True)`) skips that check. With `dtype`, a layer file
in another floating dtype (one fp16 file among fp32 ones: NeoX never writes that) is refused the same
way, naming the file, instead of failing deep inside the tensor math.

The check reads each tensor once more (in chunks: no full-size temporary), which costs little
beside the job's own reads of the same pages.
"""

from __future__ import annotations

from pathlib import Path

import torch

from neox_progressive.errors import UserError

CHUNK = 1 << 24
"""Elements checked at a time (a bool temporary of 16 MB at most)."""


def nonfinite_count(t: torch.Tensor) -> int:
    """How many NaN/Inf values `t` holds (0 for integer tensors)."""
    if not t.is_floating_point() or t.numel() == 0:
        return 0
    low, high = torch.aminmax(t)  # one pass; both propagate NaN and are +-Inf if one is there
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return 0  # ~35x faster than isfinite(t).all() on bf16
    flat = t.reshape(-1)
    bad = 0
    for start in range(0, flat.numel(), CHUNK):
        part = flat[start:start + CHUNK]
        if not bool(torch.isfinite(part).all()):
            bad += int((~torch.isfinite(part)).sum())
    return bad


def check_finite(tensors: dict[str, torch.Tensor], where: str | Path) -> None:
    """UserError for the first tensor of `tensors` holding NaN/Inf; `where` names the file."""
    for key, t in tensors.items():
        bad = nonfinite_count(t)
        if bad:
            kinds = "NaN" if bool(torch.isnan(t).any()) else ""
            if bool(torch.isinf(t).any()):
                kinds = f"{kinds} and Inf" if kinds else "Inf"
            raise UserError(f"{where}: {key} has {bad:,} non-finite value(s) ({kinds}) of {t.numel():,}; the source "
                            "checkpoint is broken (a diverged run?): use an earlier checkpoint, or pass "
                            "--allow-nonfinite to copy them anyway")


def _where(reader, index: int, rank: int) -> str:
    if reader.format == "pipeline":
        return str(reader.layer_files[(index, rank)])
    return f"{reader.mp_files[rank]} (module, sequential.{index}.*)"


def check_dtype(tensors: dict[str, torch.Tensor], where: str | Path, dtype: torch.dtype) -> None:
    """UserError for the first floating tensor of `tensors` that is not `dtype`."""
    for key, t in tensors.items():
        if t.is_floating_point() and t.dtype != dtype and not key.endswith("inv_freq"):  # a buffer, recomputed
            want, got = str(dtype).removeprefix("torch."), str(t.dtype).removeprefix("torch.")
            raise UserError(f"{where}: {key} is {got} but the checkpoint's embedding is {want}; NeoX saves every layer "
                            f"file in one dtype, so this checkpoint was edited or mixed from two: re-save it in one "
                            f"dtype (e.g. all {want})")


def guard(reader, allow: bool = False, dtype: torch.dtype | str | None = None):
    """`reader`, checking every layer file it reads (all TP ranks, once each) for NaN/Inf unless `allow`, and for
    `dtype` if given (see the module docstring).

    The check sits on the reader's one raw access, `file_state`, so every logical view built on it (parts, layers,
    the state dict) is covered whatever the architecture."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if allow and dtype is None:
        return reader
    raw, done = reader.file_state, set()

    def file_state(index: int) -> list[dict[str, torch.Tensor]]:
        ranks = raw(index)
        if index not in done:
            for rank, sd in enumerate(ranks):
                if dtype is not None:
                    check_dtype(sd, _where(reader, index, rank), dtype)
                if not allow:
                    check_finite(sd, _where(reader, index, rank))
            done.add(index)
        return ranks

    reader.file_state = file_state
    return reader
