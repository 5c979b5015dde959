"""Check a NeoX config the way NeoX checks it at start-up (GPT-NeoX ea7aefd8, NEOX_FACTS.md section 6).

Mirrors, from the facts recorded in neox_args.json:
- NeoXArgs(**config) refuses unknown keys (a dataclass TypeError);
- `validate_types` compares type(value) to the field's type exactly, except that an int is accepted
  for a float field; Literal choices compare case-insensitively; a Union accepts its member types;
  None is accepted everywhere (arguments.py validate_types);
- `calculate_derived` asserts train_batch_size == micro x GAS x dp, dp = gpus / (max(pp, 1) x mp),
  and reads zero_optimization["stage"] when the precision is bfloat16 (a TypeError without the block);
- `validate_values`: save needs checkpoint_factor or extra_save_iters, min_lr <= lr,
  max_position_embeddings >= seq_length; optimizer/scheduler need a string `type` and a `params` dict;
- merging files: a key in two files is an error.
Also flagged, because they train something else than intended: cosine decay with train_iters >
lr_decay_iters (the LR rises again), warmup x decay iterations in (0, 1) (step 0 then gets lr /
warmup_iter), and numbers PyYAML reads as strings (`1e-4`: write `1.0e-4`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from neox_progressive.config import read_yaml
from neox_progressive.errors import UserError

DATA = Path(__file__).with_name("neox_args.json")


@functools.lru_cache(maxsize=1)
def _data() -> dict:
    return json.loads(DATA.read_text())


def known_args() -> dict[str, dict]:
    """{name: {"class", "type", "default"}} for every NeoX argument."""
    return _data()["args"]


def source_commit() -> str:
    return _data()["source"]["commit"]


# Keys that the plugin's patches to NeoX add (patches/README.md): valid only in a patched NeoX, which
# `neox-progressive neox-patch --check` confirms; an unpatched NeoX refuses them (loudly, at start-up).
PATCH_ARGS = {
    "eval_tasks_limit": {"class": "patch 0001-eval-tasks-limit", "type": {"kind": "int"}, "default": 10},
    "eval_hook": {"class": "patch 0003-eval-hook", "type": {"kind": "str"}, "default": None},
    "eval_hook_args": {"class": "patch 0003-eval-hook", "type": {"kind": "dict"}, "default": None},
    "wandb_group_exact": {"class": "patch 0004-wandb-group-exact", "type": {"kind": "bool"}, "default": False},
}


def arg_spec(name: str) -> dict | None:
    """NeoX's definition of `name` (or the plugin's patches' for the keys they add); None if unknown."""
    return known_args().get(name) or PATCH_ARGS.get(name)


def _did_you_mean(name: str) -> str:
    import difflib
    close = difflib.get_close_matches(name, list(known_args()), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_number_string(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        float(value)
    except ValueError:
        return False
    return True


def _matches(value: Any, t: dict) -> bool:
    kind = t["kind"]
    if kind == "any":
        return True
    if kind == "literal":
        lowered = [c.lower() for c in t["choices"] if isinstance(c, str)]
        return value in t["choices"] or (isinstance(value, str) and value.lower() in lowered)
    if kind == "union":  # NeoX: type(value) in the Union's members (a generic like List[int] never matches)
        return any(m["kind"] not in ("literal", "generic") and _matches(value, m) for m in t["members"])
    exact = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "dict": dict, "NoneType": type(None)}
    if kind not in exact:
        return False
    if kind == "float" and type(value) is int:
        return True
    return type(value) is exact[kind]


def _type_text(t: dict) -> str:
    if t["kind"] == "literal":
        return "one of " + ", ".join(map(repr, t["choices"]))
    if t["kind"] == "union":
        return " or ".join(_type_text(m) for m in t["members"])
    return t.get("text", t["kind"])


def type_problem(key: str, value: Any) -> str | None:
    """Why NeoX would refuse `key: value`, or None if it accepts it."""
    spec = arg_spec(key)
    if spec is None:
        return f"unknown NeoX key {key!r}{_did_you_mean(key)}; NeoX refuses keys it does not define"
    if value is None or _matches(value, spec["type"]):
        return None
    if _is_number_string(value) and any(k in json.dumps(spec["type"]) for k in ('"float"', '"int"')):
        return (f"{key}: {value!r} is read by PyYAML as a string, not a number; write it with a dot, e.g. "
                f"{float(value)!r} (1.0e-4, not 1e-4)")
    if spec["type"]["kind"] == "int" and isinstance(value, float):
        return f"{key}: NeoX needs an integer, got the float {value!r}; write {int(value)}" if value.is_integer() else \
            f"{key}: NeoX needs an integer, got {value!r}"
    return f"{key}: expected {_type_text(spec['type'])}, got {type(value).__name__} {value!r}"


def _nested_number_strings(cfg: dict) -> list[str]:
    out = []
    for key in ("optimizer", "scheduler", "zero_optimization"):
        block = cfg.get(key)
        if isinstance(block, dict):
            params = block.get("params", block) if isinstance(block.get("params", block), dict) else {}
            for k, v in params.items():
                if _is_number_string(v):
                    out.append(f"{key}.{k}: {v!r} is read by PyYAML as a string; write it as a float with a dot, e.g. "
                               f"{float(v)!r}")
    return out


def _batch_problem(cfg: dict, num_gpus: int | None) -> str | None:
    gpus = cfg.get("global_num_gpus", num_gpus)
    train, micro = cfg.get("train_batch_size"), cfg.get("train_micro_batch_size_per_gpu")
    gas = cfg.get("gradient_accumulation_steps", 1)  # NeoX's default is 1, not derived (deepspeed_args.py)
    if not all(isinstance(x, int) for x in (gpus, train, micro, gas)):
        return None
    model_par = max(int(cfg.get("pipe_parallel_size", 0) or 0), 1) * int(cfg.get("model_parallel_size", 1) or 1)
    if gpus % model_par:
        return f"{gpus} GPUs are not divisible by pipe x model parallel = {model_par}"
    dp = gpus // model_par
    if train != micro * gas * dp:
        return (f"batch triple mismatch: train_batch_size {train} != train_micro_batch_size_per_gpu {micro} x "
                f"gradient_accumulation_steps {gas} x data-parallel {dp} ({gpus} GPUs); NeoX stops at launch")
    return None


def _schedule_problems(cfg: dict) -> list[str]:
    out = []
    iters, decay = cfg.get("train_iters"), cfg.get("lr_decay_iters")
    style = str(cfg.get("lr_decay_style", "linear")).lower()
    if style == "cosine" and isinstance(iters, int) and isinstance(decay, int) and iters > decay:
        out.append(f"lr_decay_style cosine with train_iters {iters} > lr_decay_iters {decay}: NeoX's cosine is not "
                   "clamped, the LR rises again after lr_decay_iters; set lr_decay_iters >= train_iters")
    horizon = decay if isinstance(decay, int) else iters
    warmup = cfg.get("warmup", 0.01)
    if isinstance(horizon, int) and isinstance(warmup, (int, float)) and 0 < warmup * horizon < 1:
        out.append(f"warmup {warmup} x {horizon} decay iterations = {warmup * horizon:.3g} warmup iterations (< 1): "
                   f"NeoX then gives step 0 a learning rate of lr / {warmup * horizon:.3g}; use warmup >= {1 / horizon:.3g}")
    lr = (cfg.get("optimizer") or {}).get("params", {}).get("lr") if isinstance(cfg.get("optimizer"), dict) else None
    min_lr = cfg.get("min_lr", 0.0)
    if isinstance(lr, (int, float)) and isinstance(min_lr, (int, float)) and min_lr > lr:
        out.append(f"min_lr {min_lr} > optimizer lr {lr}; NeoX refuses that")
    return out


def _value_problems(cfg: dict) -> list[str]:
    out = []
    prec = str(cfg.get("precision") or "").lower()
    bf16 = prec == "bfloat16" or (isinstance(cfg.get("bf16"), dict) and cfg["bf16"].get("enabled"))
    if bf16 and not isinstance(cfg.get("zero_optimization"), dict):
        out.append("bfloat16 without a zero_optimization block: NeoX reads zero_optimization['stage'] before filling in "
                   "its defaults and fails; add zero_optimization: {stage: 1}")
    for key in ("optimizer", "scheduler"):
        block = cfg.get(key)
        if isinstance(block, dict) and (not isinstance(block.get("type"), str) or not isinstance(block.get("params"), dict)):
            out.append(f"{key}: NeoX needs {{type: <name>, params: {{...}}}}, got {block!r}")
    if cfg.get("save") and not cfg.get("checkpoint_factor") and not cfg.get("extra_save_iters"):
        out.append("save is set without checkpoint_factor or extra_save_iters; NeoX refuses that: add checkpoint_factor")
    seq, maxpos = cfg.get("seq_length"), cfg.get("max_position_embeddings")
    if isinstance(seq, int) and isinstance(maxpos, int) and maxpos < seq:
        out.append(f"max_position_embeddings {maxpos} < seq_length {seq}; NeoX refuses that")
    paths = [k for k in ("train_data_paths", "valid_data_paths", "test_data_paths") if cfg.get(k)]
    if paths and len(paths) != 3:
        out.append(f"only {paths} are set; NeoX needs train_data_paths, valid_data_paths and test_data_paths all or none")
    return out


def validate_config(cfg: dict, num_gpus: int | None = None) -> list[str]:
    """Everything NeoX would refuse (or silently mis-train) in a merged config; [] if it is fine.

    `num_gpus` checks the batch triple when the config has no `global_num_gpus`.
    """
    problems = [p for key, value in cfg.items() if (p := type_problem(str(key).replace("-", "_"), value))]
    problems += _nested_number_strings(cfg)
    if (batch := _batch_problem(cfg, num_gpus)) is not None:
        problems.append(batch)
    return problems + _schedule_problems(cfg) + _value_problems(cfg)


def validate_files(paths: Iterable[str | Path], num_gpus: int | None = None) -> list[str]:
    """Merge YAML files as NeoX does (a key in two files is a problem) and validate the result."""
    merged: dict = {}
    origin: dict = {}
    problems = []
    for path in paths:
        try:
            data = read_yaml(path)
        except UserError as exc:
            problems.append(str(exc))
            continue
        for key, value in data.items():
            k = str(key).replace("-", "_")
            if k in merged:
                problems.append(f"key {k!r} is set in both {origin[k]} and {path}; NeoX refuses a key repeated across files")
            merged[k], origin[k] = value, path
    return problems + validate_config(merged, num_gpus)
