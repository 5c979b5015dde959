"""Atomic, streaming writer of GPT-NeoX checkpoints that NeoX loads with `finetune: true`.

What is written (NEOX_FACTS.md section 5):

    <out>/latest                         "global_step0" (written last)
    <out>/global_step0/
        layer_XX-model_TT-model_states.pt     pipeline format: {NeoX key: tensor}
        mp_rank_RR_model_states.pt            PP x TP files (pipeline) or TP files (sequential):
            module: None (pipeline) | {"sequential.N.key": tensor} (sequential)
            dp_world_size: 1, mp_world_size: <number of mp_rank files>,
            iteration: 0, global_steps: 0, skipped_steps: 0
        configs/<yaml>                        the configs the checkpoint was written for (optional)

No `args` entry (NeoX would assert it equals the new run's config), no optimizer, no
`inv_freq` unless the config saves it. Everything is written into a hidden temporary
directory beside `<out>` and renamed into place at the end, so a crash leaves nothing that
looks like a checkpoint; leftovers of crashed runs are removed the next time (`io/atomic.py`).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import torch

from neox_progressive import arch
from neox_progressive.config import ModelShape
from neox_progressive.errors import UserError
from neox_progressive.io.atomic import TMP_MARK, AtomicDir, check_destination  # noqa: F401  (re-exported)
from neox_progressive.io.safe import load_pt


class CheckpointWriter:
    """Write a NeoX checkpoint for `shape` (its `tp` and `pp` choose the layout), part by part.

    Use as a context manager; call `write_embed`, `write_layer` for every layer, `write_final_norm`
    and `write_head` (any order), each with logical tensors. Memory: one layer at a time for the
    pipeline format; the sequential format spools each part to disk and assembles the mp_rank
    files from memory-mapped spools at the end.

    Args:
        out: destination directory (the NeoX `load` dir).
        shape: target shape; `padded_vocab_size` must be known.
        force: replace an existing `out`.
        tag: checkpoint tag written to `latest`.
        configs: YAML files copied into `<tag>/configs/` as NeoX does.
        extra_files: {relative name: text} written into `out` (e.g. a manifest).
        need_bytes: about the bytes to be written: the free space is checked before starting.
    """

    def __init__(self, out: str | Path, shape: ModelShape, *, force: bool = False, tag: str = "global_step0",
                 configs: list[str | Path] | None = None, extra_files: dict[str, str] | None = None,
                 dtype: torch.dtype | None = None, need_bytes: int | None = None):
        if shape.padded_vocab_size is None:
            raise UserError("the target vocab size is unknown; it must come from a tokenizer file or the source checkpoint")
        self.shape = shape
        self.tag = tag
        self.dtype = dtype
        self.configs = [Path(c) for c in configs or []]
        self.extra_files = dict(extra_files or {})
        self._atomic = AtomicDir(out, force, need_bytes=need_bytes)
        self._written: set[int] = set()
        self.root: Path | None = None

    # ---- context ---------------------------------------------------------------------------
    def __enter__(self) -> CheckpointWriter:
        self.root = self._atomic.__enter__()
        self.tag_dir = self.root / self.tag
        self.tag_dir.mkdir()
        if self.shape.sequential:
            self.spool = self.root / ".spool"
            self.spool.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self._finish()
            except BaseException:
                self._atomic.__exit__(*sys.exc_info())
                raise
        return self._atomic.__exit__(exc_type, exc, tb)

    @property
    def out(self) -> Path:
        return self._atomic.out

    # ---- parts -----------------------------------------------------------------------------
    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.dtype is None else t.to(self.dtype)

    def _put(self, index: int, ranks: list[dict[str, torch.Tensor]]) -> None:
        if index in self._written:
            raise RuntimeError(f"layer index {index} written twice")
        want = arch.neox_file_shapes(self.shape)[index]
        for sd in ranks:
            assert {k: tuple(v.shape) for k, v in sd.items()} == want, (index, {k: v.shape for k, v in sd.items()}, want)
        self._written.add(index)
        for t, sd in enumerate(ranks):
            sd = {k: self._cast(v) for k, v in sd.items()}
            path = self.spool / f"{index}-{t}.pt" if self.shape.sequential else self.tag_dir / arch.layer_file_name(index, t)
            self._atomic.current = path
            torch.save(sd, path)

    def write_part(self, part: str, tensors: dict[str, torch.Tensor], layer: int | None = None) -> None:
        """Write one part ('embed', 'layer' with its index, 'final_norm', 'head') from its logical tensors."""
        want = arch.logical_layer_shapes(self.shape) if part == "layer" else {
            k: s for k, s in arch.logical_global_shapes(self.shape).items() if k in arch.logical_part_keys(part, self.shape)}
        got = {k: tuple(v.shape) for k, v in tensors.items()}
        if got != want:
            where = f"layer {layer}" if part == "layer" else part
            raise RuntimeError(f"{where}: logical shapes {got} do not match the target {want}")
        self._put(arch.part_index(part, self.shape, layer), arch.part_to_neox(part, tensors, self.shape))

    def write_embed(self, weight: torch.Tensor, pos_embed: torch.Tensor | None = None) -> None:
        """Word embeddings, plus the learned position table where the shape has one."""
        self.write_part("embed", {"embed.weight": weight, **({"pos_embed.weight": pos_embed} if pos_embed is not None else {})})

    def write_layer(self, i: int, layer: dict[str, torch.Tensor]) -> None:
        self.write_part("layer", layer, i)

    def write_final_norm(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """The final norm's weight, plus its bias for LayerNorm."""
        self.write_part("final_norm", {"final_norm.weight": weight, **({"final_norm.bias": bias} if bias is not None else {})})

    def write_head(self, weight: torch.Tensor) -> None:
        self.write_part("head", {"head.weight": weight})

    def write_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Write a whole logical model held in memory."""
        for part in arch.GLOBAL_PARTS:
            self.write_part(part, {k: sd[k] for k in arch.logical_part_keys(part, self.shape)})
        for i in range(self.shape.num_layers):
            prefix = f"layers.{i}."
            self.write_layer(i, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})

    # ---- finish ----------------------------------------------------------------------------
    def _mp_state(self, module, n_files: int) -> dict:
        return {
            "module": module,
            "dp_world_size": 1,
            "mp_world_size": n_files,
            "iteration": 0,
            "global_steps": 0,
            "skipped_steps": 0,
        }

    def _finish(self) -> None:
        expected = set(arch.neox_file_shapes(self.shape))
        if self._written != expected:
            raise RuntimeError(f"checkpoint incomplete: indices {sorted(expected - self._written)} not written")
        shape = self.shape
        if shape.sequential:
            for t in range(shape.tp):
                module = {}
                for index in sorted(expected):
                    part = load_pt(self.spool / f"{index}-{t}.pt")  # memory-mapped
                    module.update({f"sequential.{index}.{k}": v for k, v in part.items()})
                self._atomic.current = self.tag_dir / arch.mp_rank_file_name(t)
                torch.save(self._mp_state(module, shape.tp), self._atomic.current)
                del module
            shutil.rmtree(self.spool)
        else:
            n = max(shape.pp, 1) * shape.tp
            for r in range(n):
                torch.save(self._mp_state(None, n), self.tag_dir / arch.mp_rank_file_name(r))
        if self.configs:
            cdir = self.tag_dir / "configs"
            cdir.mkdir()
            for c in self.configs:
                shutil.copyfile(c, cdir / c.name)
        for name, text in self.extra_files.items():
            (self.root / name).write_text(text)
        _fsync_tree(self.root)
        (self.root / "latest").write_text(self.tag)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_checkpoint(out: str | Path, shape: ModelShape, sd: dict[str, torch.Tensor], **kwargs) -> Path:
    """Write a whole in-memory logical model as a NeoX checkpoint; returns `out`."""
    with CheckpointWriter(out, shape, **kwargs) as w:
        w.write_state_dict(sd)
    return Path(out)
