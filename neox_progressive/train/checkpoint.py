"""The builtin engine's checkpoints: NeoX's own layout plus one file of training state.

    <save>/latest                               "global_step<N>", replaced atomically after the tag dir is complete
    <save>/global_step<N>/                      written by `io.writer.CheckpointWriter`: exactly NeoX's model files
        layer_XX-model_TT-model_states.pt | mp_rank_TT (sequential), mp_rank_RR_model_states.pt (iteration: N)
        configs/<the stage YAMLs>
        neox_progressive_train_state.pt         what resuming needs (below); NeoX never opens it

The state file holds the optimizer state, the fp32 master weights when the model files are
bf16/fp16 (so resuming does not round the weights), the iteration, the samples consumed, the
torch RNG state, NeoX's `lr_scheduler` dict, and a fingerprint of everything that decides the
training trajectory. NeoX loads these checkpoints with `finetune: true` (module only), as it loads
any external checkpoint; a full NeoX resume would need DeepSpeed's optimizer files, which this
engine does not write.

A tag dir is built under a hidden name in `<save>` and renamed into place, then `latest` is
replaced, so a process killed at any moment leaves either the previous checkpoint or the new one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from neox_progressive.config import ModelShape
from neox_progressive.errors import UserError
from neox_progressive.io.safe import load_pt
from neox_progressive.io.writer import CheckpointWriter

STATE_FILE = "neox_progressive_train_state.pt"
STAGING = ".staging-"
STATE_FORMAT = 1


class _IterationWriter(CheckpointWriter):
    """CheckpointWriter whose mp_rank files record the iteration (NeoX's `iteration`, DeepSpeed's `global_steps`)."""

    def __init__(self, *args, iteration: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.iteration = iteration

    def _mp_state(self, module, n_files: int) -> dict:
        state = super()._mp_state(module, n_files)
        state.update(iteration=self.iteration, global_steps=self.iteration)
        return state


def tag_of(iteration: int) -> str:
    return f"global_step{iteration}"


def remove_stale_staging(save: Path) -> None:
    """Leftovers of a process killed while saving."""
    if save.is_dir():
        for p in save.iterdir():
            if p.name.startswith(STAGING) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(save: Path, iteration: int, shape: ModelShape, model_sd: dict[str, torch.Tensor],
                    train_state: dict[str, Any], configs: list[Path], dtype: torch.dtype,
                    keep_last: int | None = None) -> Path:
    """Write `<save>/global_step<iteration>` and point `latest` at it; returns the tag dir."""
    tag = tag_of(iteration)
    save.mkdir(parents=True, exist_ok=True)
    staging = save / f"{STAGING}{tag}-{os.getpid()}"
    with _IterationWriter(staging, shape, force=True, tag=tag, configs=configs, dtype=dtype, iteration=iteration) as w:
        w.write_state_dict(model_sd)
    state_path = staging / tag / STATE_FILE
    torch.save(train_state, state_path)
    with state_path.open("rb") as f:
        os.fsync(f.fileno())
    final = save / tag
    trash = save / f"{STAGING}old-{tag}-{os.getpid()}"
    if final.exists():
        os.replace(final, trash)
    os.replace(staging / tag, final)
    _write_text_atomic(save / "latest", tag)
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    if keep_last:
        prune(save, keep_last)
    return final


def prune(save: Path, keep_last: int) -> None:
    """NeoX's keep_last_n_checkpoints: delete all but the newest `keep_last` global_step dirs."""
    steps = sorted(int(p.name[len("global_step"):]) for p in save.glob("global_step*") if p.name[len("global_step"):].isdigit())
    for step in steps[:-keep_last]:
        shutil.rmtree(save / tag_of(step), ignore_errors=True)


def latest_tag_dir(path: Path, iteration: int | None = None) -> Path | None:
    """The tag dir `latest` (or `iteration`) names in a save dir, or None when there is none."""
    if iteration is not None:
        tag_dir = path / tag_of(iteration)
        if not tag_dir.is_dir():
            tags = sorted(p.name for p in path.glob("global_step*"))
            raise UserError(f"config key iteration: {iteration} but {tag_dir} does not exist (found {tags})")
        return tag_dir
    latest = path / "latest"
    if not latest.is_file():
        return None
    tag_dir = path / latest.read_text().strip()
    if not tag_dir.is_dir():
        raise UserError(f"{latest} names {tag_dir.name} but that directory does not exist; fix `latest` or restore the dir")
    return tag_dir


def read_train_state(tag_dir: Path) -> dict[str, Any] | None:
    """The builtin engine's state in a tag dir, or None (NeoX- or expand-written checkpoints have none)."""
    path = tag_dir / STATE_FILE
    if not path.is_file():
        return None
    state = load_pt(path, mmap=False)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path} is not a training state this version can resume from (format {state.get('format')!r})")
    return state
