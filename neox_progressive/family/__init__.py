"""Model families: the family file, the Eq. 4 budget plan, and per-stage NeoX configs.

Public API (used by the runner, prepare-data and the `plan` / `generate-configs` verbs):
- `load_family(path, overrides=None) -> Family`: read and check a family file (spec.py documents the
  format; configs/neox/README.md has examples). `overrides` is a nested dict merged into the file
  before it is checked (e.g. {"output_dir": ...}); relative paths resolve against the file's dir.
- `Family`: `.name`, `.members` (each `.name`, `.shape() -> ModelShape`), `.output_dir`,
  `.expansion` (ExpandOptions fields), `.eval` (EvalSettings fields), `.wandb`, `.data` (train,
  valid, test prefixes; `prepare` source for prepare-data), `.shared` (NeoX keys), `.mode`.
- `plan_family(family, mode) -> Plan`: per member params, scratch/progressive tokens, FLOPs,
  cumulative FLOPs, train_iters, realized tokens, max/min LR, data_windows, train_data_path.
- `generate_configs(family, out_dir, mode) -> list[Path]`: stage_<name>.yml + family_plan.{json,md,png}.
- `member_dirs(family, mode, member) -> MemberDirs(root, expanded, checkpoints)`: the directory
  convention `<output_dir>/<mode>/<member>/{expanded,checkpoints}`; `expanded` is member k > 1's
  expanded init (its stage's `load`), `checkpoints` its stage's `save`. mode: progressive | independent.
"""

from neox_progressive.family.budget import (
    MemberDirs,
    Plan,
    PlanRow,
    batch_triple,
    max_lrs,
    member_dirs,
    member_params,
    plan_family,
    scratch_budgets,
    token_budgets,
)
from neox_progressive.family.family_file import load_family
from neox_progressive.family.spec import MODES, Family, MemberSpec
from neox_progressive.family.stages import dump_stage, generate_configs, stage_config

__all__ = [
    "MODES", "Family", "MemberDirs", "MemberSpec", "Plan", "PlanRow", "batch_triple", "dump_stage", "generate_configs",
    "load_family", "max_lrs", "member_dirs", "member_params", "plan_family", "scratch_budgets", "stage_config",
    "token_budgets",
]
