"""The training settings of a stage, read from the same NeoX YAML files NeoX reads.

Keys and defaults are NeoX's (megatron/neox_arguments/neox_args.py, deepspeed_args.py at ea7aefd8);
every key used here is type-checked; keys only NeoX needs (parallelism, fusions, ZeRO, launcher,
logging back ends) are ignored; keys that would change training in a way this engine cannot
reproduce are refused with a message. Batch sizes follow NeoX's `calculate_batch_parameters` with
one data-parallel rank: `gradient_accumulation_steps` defaults to 1, a missing micro batch is
train_batch_size / gradient_accumulation_steps, and train_batch_size must equal micro x GAS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neox_progressive.config import ModelShape, merge_neox_configs
from neox_progressive.errors import UserError
from neox_progressive.train.schedule import LRSchedule

INIT_METHODS = ("normal", "scaled_normal", "single_residual_scaled_normal", "small_init", "wang_init")
# NeoX keys that would make this engine train something else than NeoX would: key -> allowed values.
REFUSED = {
    "eod_mask_loss": (False, None),
    "train_impl": ("normal", None),
    "train_label_data_paths": (None, []),
    "pack_impl": ("packed", None),
    "use_mup": (False, None),
}


def _typed(cfg: dict, key: str, kind, default):
    value = cfg.get(key, default)
    if value is None:
        return None
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"config key {key}: expected {kind.__name__}, got {value!r}")
    return value


@dataclass
class DatasetPart:
    """One dataset the engine reads: a NeoX mmap prefix and the item range it uses."""

    prefix: str
    first_item: int | None = None
    end_item: int | None = None
    split_index: int | None = None
    """0/1/2 = train/valid/test part of `data_path` split by `split`, else None (whole dataset)."""


@dataclass
class TrainSettings:
    shape: ModelShape
    config_paths: list[Path]
    cfg: dict[str, Any]
    seed: int
    optimizer: dict[str, Any]
    weight_decay: float
    gradient_clipping: float
    schedule: LRSchedule
    train_iters: int
    micro_batch: int
    grad_acc: int
    train_data: DatasetPart
    valid_data: DatasetPart | None
    split: str
    eval_interval: int | None
    eval_iters: int
    load: Path | None
    finetune: bool
    load_iteration: int | None
    save: Path | None
    checkpoint_factor: float | None
    checkpoint_scale: str
    extra_save_iters: list[int]
    keep_last_n_checkpoints: int | None
    log_interval: int
    exit_interval: int | None
    precision: str
    init_method: str
    output_layer_init_method: str
    init_method_std: float
    override_lr_scheduler: bool
    use_checkpoint_lr_scheduler: bool
    wandb: dict[str, Any] | None
    log_dir: Path | None
    notes: list[str] = field(default_factory=list)

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_acc

    @property
    def seq_length(self) -> int:
        return self.shape.seq_length

    @property
    def tokens_per_iteration(self) -> int:
        return self.global_batch * self.seq_length

    def is_save_iter(self, iteration: int) -> bool:
        """NeoX's training.is_save_iter."""
        if iteration in self.extra_save_iters:
            return True
        if self.checkpoint_factor:
            if self.checkpoint_scale == "linear":
                return iteration % int(self.checkpoint_factor) == 0
            power = 1.0
            while power < iteration + 1:
                if int(power) == iteration:
                    return True
                power *= self.checkpoint_factor
        return False


def _resolve(path: str, base: Path) -> str:
    """As given (NeoX resolves against its working directory), else next to the config files."""
    p = Path(path)
    if p.is_absolute() or Path(str(p) + ".idx").exists() or p.exists():
        return str(p)
    alt = base / p
    return str(alt) if Path(str(alt) + ".idx").exists() or alt.exists() else str(p)


def _one_path(cfg: dict, key: str, base: Path) -> str | None:
    value = cfg.get(key)
    if value in (None, []):
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UserError(f"config key {key}: expected a list of dataset prefixes, got {value!r}")
    if len(value) != 1:
        raise UserError(f"config key {key} lists {len(value)} datasets; the builtin engine reads one (NeoX would blend "
                        "them by weight): concatenate them with prepare-data into one dataset")
    return _resolve(value[0], base)


def _data(cfg: dict, base: Path) -> tuple[DatasetPart, DatasetPart | None]:
    train = _one_path(cfg, "train_data_paths", base)
    if train is not None:
        valid = _one_path(cfg, "valid_data_paths", base)
        return DatasetPart(train), (DatasetPart(valid) if valid else None)
    data_path = cfg.get("data_path")
    if data_path is None:
        raise UserError("no training data: set train_data_paths (and valid_data_paths) or data_path in the config, "
                        "e.g. train_data_paths: [data/train]")
    if not isinstance(data_path, str):
        raise UserError(f"config key data_path: expected one dataset prefix, got {data_path!r}")
    prefix = _resolve(data_path, base)
    return DatasetPart(prefix, split_index=0), DatasetPart(prefix, split_index=1)


def _batches(cfg: dict) -> tuple[int, int]:
    train = _typed(cfg, "train_batch_size", int, None)
    micro = _typed(cfg, "train_micro_batch_size_per_gpu", int, None)
    gas = _typed(cfg, "gradient_accumulation_steps", int, 1)
    if micro is None and train is None:
        raise UserError("set train_micro_batch_size_per_gpu (and gradient_accumulation_steps) in the config")
    if micro is None:
        micro = train // gas
    if micro < 1 or gas < 1:
        raise UserError(f"batch sizes must be positive: micro batch {micro}, gradient_accumulation_steps {gas}")
    if train is not None and train != micro * gas:
        raise UserError(
            f"train_batch_size {train} != train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps {gas} "
            f"on one device; the builtin engine has no data parallelism: for the same global batch set "
            f"gradient_accumulation_steps: {max(1, train // micro)} (or drop train_batch_size)"
        )
    return micro, gas


def _wandb(cfg: dict) -> dict | None:
    if cfg.get("use_wandb") is not True:
        return None
    return {"project": _typed(cfg, "wandb_project", str, "neox"), "group": _typed(cfg, "wandb_group", str, None),
            "name": _typed(cfg, "wandb_run_name", str, None), "entity": _typed(cfg, "wandb_team", str, None),
            "host": _typed(cfg, "wandb_host", str, None)}


def _check_refused(cfg: dict) -> list[str]:
    for key, allowed in REFUSED.items():
        if key in cfg and cfg[key] not in allowed:
            raise UserError(f"config key {key}: {cfg[key]!r} is not supported by the builtin engine "
                            f"(it trains with {key}: {allowed[0]!r}); train this stage with NeoX instead")
    notes = []
    for key in ("hidden_dropout", "attention_dropout"):
        if _typed(cfg, key, float, 0.0):
            notes.append(f"{key}={cfg[key]} is ignored: the builtin engine trains without dropout")
    return notes


def _optimizer(cfg: dict) -> dict:
    opt = cfg.get("optimizer") or {"type": "Adam", "params": {}}
    if not isinstance(opt, dict) or not isinstance(opt.get("params", {}), dict):
        raise UserError(f"config key optimizer: expected {{type: Adam, params: {{lr: ..., betas: [...], eps: ...}}}}, "
                        f"got {opt!r}")
    kind = str(opt.get("type", "Adam"))
    if kind.lower() != "adam":
        raise UserError(f"optimizer type {kind!r} is not supported by the builtin engine; use type: Adam "
                        "(NeoX's Adam is AdamW-style: decoupled weight decay)")
    params = opt.get("params", {})
    unknown = sorted(set(params) - {"lr", "betas", "eps"})
    if unknown:
        hint = " (NeoX passes the top-level weight_decay itself and fails on a second one)" if "weight_decay" in unknown else ""
        raise UserError(f"optimizer.params has {unknown}, which the builtin engine does not use (lr, betas, eps){hint}")
    lr = _typed(params, "lr", float, 0.001)
    betas = params.get("betas", [0.9, 0.999])
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2 and all(isinstance(b, (int, float)) for b in betas)):
        raise UserError(f"optimizer.params.betas: expected two numbers like [0.9, 0.95], got {betas!r}")
    return {"lr": lr, "betas": (float(betas[0]), float(betas[1])), "eps": _typed(params, "eps", float, 1e-8)}


def _check_init(cfg: dict, key: str, default: str) -> str:
    value = _typed(cfg, key, str, default)
    if value not in INIT_METHODS:
        raise UserError(f"config key {key}: {value!r} is not implemented by the builtin engine; choose one of {INIT_METHODS}")
    return value


def read_settings(config_paths: list[str | Path]) -> TrainSettings:
    """Read and check a stage's NeoX YAML files (several files are merged as NeoX merges them)."""
    paths = [Path(p) for p in config_paths]
    cfg = merge_neox_configs(paths)
    base = paths[0].parent
    shape = ModelShape.from_neox(cfg, base_dir=base)
    notes = _check_refused(cfg)
    train_iters = _typed(cfg, "train_iters", int, None)
    if train_iters is None or train_iters < 0:
        raise UserError(f"config key train_iters: expected a non-negative integer, got {cfg.get('train_iters')!r}")
    micro, gas = _batches(cfg)
    train_data, valid_data = _data(cfg, base)
    optimizer = _optimizer(cfg)
    schedule = LRSchedule.from_neox(cfg, optimizer["lr"], train_iters)
    if 0 < schedule.warmup_iter < 1:
        notes.append(f"warmup {cfg.get('warmup', 0.01)} x {schedule.end_iter} decay iterations = {schedule.warmup_iter:g} "
                     f"warmup iterations (< 1): NeoX's formula then gives step 0 a learning rate of "
                     f"{schedule.lr(0):.3g} (lr / warmup_iter); reproduced as NeoX does")
    load = cfg.get("load")
    save = cfg.get("save")
    factor = cfg.get("checkpoint_factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor <= 0):
        raise UserError(f"config key checkpoint_factor: expected a positive number, got {factor!r}")
    scale = _typed(cfg, "checkpoint_scale", str, "linear")
    if scale not in ("linear", "log"):
        raise UserError(f"config key checkpoint_scale: expected linear or log, got {scale!r}")
    if scale == "log" and factor is not None and factor <= 1:
        raise UserError("checkpoint_scale: log needs checkpoint_factor > 1")
    if scale == "linear" and factor is not None and not float(factor).is_integer():
        raise UserError(f"checkpoint_factor must be a whole number with checkpoint_scale: linear, got {factor}")
    extra = cfg.get("extra_save_iters") or []
    if not isinstance(extra, list) or not all(isinstance(i, int) for i in extra):
        raise UserError(f"config key extra_save_iters: expected a list of iterations, got {extra!r}")
    if save is not None and factor is None and not extra:
        raise UserError("save is set but neither checkpoint_factor nor extra_save_iters is; NeoX refuses that too: "
                        "add e.g. checkpoint_factor: 1000")
    eval_interval = _typed(cfg, "eval_interval", int, 1000)
    precision = shape.params_dtype
    settings = TrainSettings(
        shape=shape, config_paths=paths, cfg=cfg, seed=_typed(cfg, "seed", int, 1234), optimizer=optimizer,
        weight_decay=_typed(cfg, "weight_decay", float, 0.1), gradient_clipping=_typed(cfg, "gradient_clipping", float, 1.0),
        schedule=schedule, train_iters=train_iters, micro_batch=micro, grad_acc=gas, train_data=train_data,
        valid_data=valid_data, split=str(cfg.get("split", "969, 30, 1")),
        eval_interval=eval_interval if eval_interval else None, eval_iters=_typed(cfg, "eval_iters", int, 100),
        load=Path(_typed(cfg, "load", str, None)) if load else None, finetune=bool(cfg.get("finetune", False)),
        load_iteration=_typed(cfg, "iteration", int, None), save=Path(_typed(cfg, "save", str, None)) if save else None,
        checkpoint_factor=factor, checkpoint_scale=scale, extra_save_iters=extra,
        keep_last_n_checkpoints=_typed(cfg, "keep_last_n_checkpoints", int, None),
        log_interval=max(1, _typed(cfg, "log_interval", int, 100) or 100), exit_interval=_typed(cfg, "exit_interval", int, None),
        precision=precision, init_method=_check_init(cfg, "init_method", "normal"),
        output_layer_init_method=_check_init(cfg, "output_layer_init_method", "scaled_normal"),
        init_method_std=_typed(cfg, "init_method_std", float, 0.02),
        override_lr_scheduler=bool(cfg.get("override_lr_scheduler", False)),
        use_checkpoint_lr_scheduler=bool(cfg.get("use_checkpoint_lr_scheduler", False)),
        wandb=_wandb(cfg), log_dir=Path(cfg["log_dir"]) if cfg.get("log_dir") else None, notes=notes,
    )
    if settings.override_lr_scheduler and settings.use_checkpoint_lr_scheduler:
        raise UserError("override_lr_scheduler and use_checkpoint_lr_scheduler are both set; NeoX refuses that: keep one")
    if not math.isfinite(settings.gradient_clipping) or settings.gradient_clipping < 0:
        raise UserError(f"gradient_clipping must be >= 0, got {settings.gradient_clipping}")
    return settings
