"""The builtin training engine: one stage on one CPU or GPU, from the same NeoX YAML NeoX reads.

Public API (stable; the family runner builds on it):
- `train_stage(stage_yaml_paths, *, device=None, quiet=False, log_path=None, resume=True,
  callback=None) -> StageResult`
- `expanded_loss(ckpt, config, data=None, n_batches=4)`, `check_stage_start(expanded, first_losses,
  vocab_size)` -> `StartCheck`, `require_expanded_start(...)`: the stage-start check;
  `parse_neox_losses(log_text)`: the per-iteration losses of a NeoX log, for that check.
- `LRSchedule` (NeoX's AnnealingLR), `read_settings(paths)`, `read_metrics(path, kind)`.

Run one stage from the shell: `python -m neox_progressive.train stage.yml [more.yml ...]`.
"""

from neox_progressive.train.engine import StageResult, train_stage
from neox_progressive.train.metrics import read_metrics
from neox_progressive.train.schedule import LRSchedule
from neox_progressive.train.settings import TrainSettings, read_settings
from neox_progressive.train.start_check import (
    StartCheck,
    check_stage_start,
    expanded_loss,
    parse_neox_losses,
    require_expanded_start,
)

__all__ = [
    "LRSchedule", "StageResult", "StartCheck", "TrainSettings", "check_stage_start", "expanded_loss", "read_metrics",
    "parse_neox_losses", "read_settings", "require_expanded_start", "train_stage",
]
