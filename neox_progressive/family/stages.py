"""Per-stage NeoX configs: one complete YAML per member, `stage_<name>.yml`, runnable alone.

`python deepy.py train.py stage_<name>.yml` (NeoX) or `python -m neox_progressive.train
stage_<name>.yml` (builtin engine) trains the member. What each stage holds:
- the member's shape from `ModelShape.to_neox()` (so the stage and our checkpoint reader agree);
- the batch triple, all explicit (train_batch_size = micro x GAS x dp; NeoX stops at launch on the
  wrong GPU count instead of training another number of tokens);
- train_iters = ceil(tokens / (global batch x seq)), lr_decay_iters = train_iters, NeoX's warmup
  fraction, cosine by default, max LR in optimizer.params.lr, min_lr;
- bf16 with a zero_optimization block and data_types.grad_accum_dtype fp32 (NEOX_FACTS section 6);
- data: the member's window dataset (`<train prefix>.<family>.<member>`), validation/test prefixes, mmap;
- `save` = <output_dir>/<mode>/<member>/checkpoints with checkpoint_factor; for member k > 1 of a
  progressive family `load` = its expanded dir and `finetune: true` (never `no_load_optim`);
- use_wandb always explicit; wandb_group exactly as configured;
- then the family's `shared` NeoX keys (which may not set any of the keys above).
Every stage is checked by neox_progressive.neox_args before it is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from neox_progressive.errors import UserError
from neox_progressive.family.budget import Plan, PlanRow, member_dirs, plan_family
from neox_progressive.family.fields import did_you_mean
from neox_progressive.family.spec import Family, MemberSpec
from neox_progressive.neox_args import arg_spec, known_args, type_problem, validate_config

# NeoX keys the planner writes from the family file; `shared` may not set them (say where instead).
OWNED = {
    "precision": "training.precision", "train_batch_size": "members[].global_batch",
    "train_micro_batch_size_per_gpu": "training.micro_batch", "gradient_accumulation_steps": "training.micro_batch",
    "train_iters": "budget", "lr_decay_iters": "budget", "lr_decay_style": "training.lr.decay_style",
    "warmup": "training.lr.warmup", "min_lr": "training.lr.min/min_ratio", "optimizer": "training.lr and training.betas",
    "weight_decay": "training.weight_decay", "gradient_clipping": "training.gradient_clipping",
    "init_method": "training.init_method", "output_layer_init_method": "training.output_layer_init_method",
    "seed": "training.seed", "load": "output_dir", "save": "output_dir", "finetune": "the mode",
    "checkpoint_factor": "training.checkpoint_interval", "train_data_paths": "data.train", "valid_data_paths": "data.valid",
    "test_data_paths": "data.test", "train_data_weights": "data", "valid_data_weights": "data", "test_data_weights": "data",
    "data_path": "data.train", "use_wandb": "wandb.enabled", "wandb_project": "wandb.project", "wandb_group": "wandb.group",
    "wandb_team": "wandb.team", "wandb_host": "wandb.host", "wandb_run_name": "wandb", "eval_interval": "training.eval_interval",
    "eval_iters": "training.eval_iters", "log_interval": "training.log_interval", "no_load_optim": "never (trains nothing)",
    "zero_optimization": "training.zero_stage", "bf16": "training.precision", "fp16": "training.precision",
}
SHAPE_KEYS = ("pipe_parallel_size", "model_parallel_size", "num_layers", "hidden_size", "num_attention_heads", "num_kv_heads",
              "intermediate_size", "mlp_multiple_of", "seq_length", "max_position_embeddings", "pos_emb", "rotary_pct",
              "rotary_emb_base", "norm", "rms_norm_epsilon", "layernorm_epsilon", "activation", "bias_gelu_fusion",
              "no_weight_tying", "gpt_j_residual",
              "use_bias_in_attn_linear", "use_bias_in_mlp", "make_vocab_size_divisible_by", "output_layer_parallelism")
ZERO_DEFAULTS = {"allgather_partitions": True, "allgather_bucket_size": 500000000, "overlap_comm": True,
                 "reduce_scatter": True, "reduce_bucket_size": 500000000, "contiguous_gradients": True}


def check_shared(family: Family) -> None:
    """`shared` holds NeoX keys only, none the planner writes, each of NeoX's type."""
    for key, value in family.shared.items():
        if key in OWNED or key in SHAPE_KEYS:
            where = OWNED.get(key, "members[] / model")
            raise UserError(f"{family.path}: shared.{key} is written by the planner for every stage; set it in the "
                            f"family file's {where} instead")
        if arg_spec(key) is None:
            raise UserError(f"{family.path}: shared.{key} is not a NeoX key{did_you_mean(key, known_args())}")
        problem = type_problem(key, value)
        if problem:
            raise UserError(f"{family.path}: shared.{problem}")


def _precision(family: Family) -> dict[str, Any]:
    t = family.training
    out: dict[str, Any] = {"precision": t.precision, "zero_optimization": {"stage": t.zero_stage, **ZERO_DEFAULTS}}
    if t.precision == "bfloat16":
        out["data_types"] = {"grad_accum_dtype": "fp32"}
    if t.precision == "fp16":
        out["fp16"] = {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    return out


def _data(family: Family, row: PlanRow) -> dict[str, Any]:
    test = family.data.test or family.data.valid
    return {"data_impl": "mmap", "train_data_paths": [row.train_data_path], "valid_data_paths": [family.data.valid],
            "test_data_paths": [test], "train_data_weights": [1.0], "valid_data_weights": [1.0], "test_data_weights": [1.0]}


def _wandb(family: Family, mode: str, member: MemberSpec) -> dict[str, Any]:
    w = family.wandb
    out: dict[str, Any] = {"use_wandb": bool(w.enabled)}
    if w.enabled:
        out.update({"wandb_project": w.project or family.name, "wandb_group": w.group or f"{family.name}-{mode}",
                    "wandb_run_name": f"{family.name}-{mode}-{member.name}"})
        out.update({k: v for k, v in (("wandb_team", w.team), ("wandb_host", w.host)) if v})
        if w.neox_exact_group:
            out["wandb_group_exact"] = True  # a key of patches/0004-wandb-group-exact
    return out


def stage_config(family: Family, plan: Plan, member_name: str, stage_dir: Path | None = None) -> dict[str, Any]:
    """The complete NeoX config of one stage (a dict, in the order it is written).

    `stage_dir`: where the stage files are written; with the family's `eval.neox_kl_hook`, member k > 1
    gets the eval hook (patches/0003) that logs its KL to member k-1 (`stage_<k-1>.yml` in that dir).
    """
    member = family.member(member_name)
    row, t, mode = plan.row(member.name), family.training, plan.mode
    dirs = member_dirs(family, mode, member.name)
    index = [m.name for m in family.members].index(member.name)
    cfg: dict[str, Any] = dict(member.shape().to_neox())
    cfg.update(_precision(family))
    cfg.update({
        "train_batch_size": row.global_batch, "train_micro_batch_size_per_gpu": row.micro_batch,
        "gradient_accumulation_steps": row.gradient_accumulation_steps,
        "train_iters": row.train_iters, "lr_decay_iters": row.train_iters, "lr_decay_style": t.lr.decay_style,
        "warmup": t.lr.warmup, "optimizer": {"type": "Adam", "params": {"lr": row.max_lr, "betas": list(t.betas), "eps": t.eps}},
        "min_lr": row.min_lr, "weight_decay": t.weight_decay, "gradient_clipping": t.gradient_clipping,
        "init_method": t.init_method, "output_layer_init_method": t.output_layer_init_method, "seed": t.seed,
    })
    cfg.update(_data(family, row))
    cfg.update({"save": str(dirs.checkpoints), "checkpoint_factor": min(t.checkpoint_interval, row.train_iters)})
    if (mode == "progressive" and index > 0) or (index == 0 and member.init_train):
        cfg.update({"load": str(dirs.expanded), "finetune": True})  # the expanded (or imported, trained on) start
    cfg.update({"eval_interval": t.eval_interval, "eval_iters": t.eval_iters, "log_interval": t.log_interval})
    cfg.update(_wandb(family, mode, member))
    if family.eval.get("neox_kl_hook") and index > 0 and stage_dir is not None:
        cfg.update(_kl_hook(family, mode, family.members[index - 1].name, dirs.root, Path(stage_dir)))
    cfg.update(family.shared)
    if row.sample_order:
        _check_sample_order(family, cfg)
    problems = validate_config(cfg, num_gpus=row.num_gpus)
    if problems:
        raise UserError(f"{family.path}: the stage config of {member.name} would not run: {problems[0]}"
                        + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    return cfg


def _check_sample_order(family: Family, cfg: dict[str, Any]) -> None:
    """The epoch order works through NeoX's cached index maps of a packed dataset; keys that change how NeoX builds
    or names them would silently give NeoX's own shuffle back."""
    bad = {"pack_impl": cfg.get("pack_impl", "packed") != "packed", "weight_by_num_documents": cfg.get("weight_by_num_documents"),
           "train_epochs": cfg.get("train_epochs"), "use_shared_fs": cfg.get("use_shared_fs", True) is False}
    for key, is_bad in bad.items():
        if is_bad:
            raise UserError(f"{family.path}: shared.{key} {cfg[key]!r} stops NeoX from reading the fixed-data epochs in "
                            "order (budget.fixed_data_order: epochs works through NeoX's cached index maps of a packed "
                            "dataset); remove it, or set budget.fixed_data_order: shuffled")


def check_expansions(family: Family) -> None:
    """Plan every expansion member k-1 -> k from the shapes alone (no tensors; see neox_progressive.expand), so a
    pair the expansion cannot grow (head_dim changes, a GQA layout it refuses, ...) is an error before anything
    trains or is written."""
    from neox_progressive.expand import ExpandOptions
    from neox_progressive.expand.plan import plan_expansion

    options = ExpandOptions.from_dict(dict(family.expansion or {}))
    for a, b in zip(family.members, family.members[1:]):
        try:
            plan_expansion(a.shape(), b.shape(), options, stage=f"{a.name}->{b.name}")
        except UserError as exc:
            raise UserError(f"{family.path}: member {b.name} cannot be expanded from {a.name}: {exc}") from None


def _kl_hook(family: Family, mode: str, previous: str, root: Path, stage_dir: Path) -> dict[str, Any]:
    from neox_progressive.eval.neox_hook import hook_config

    return hook_config(member_dirs(family, mode, previous).checkpoints, [stage_dir / f"stage_{previous}.yml"],
                       data_path=str(family.data.valid), log_file=root / "kl_to_previous.jsonl")


def _header(family: Family, plan: Plan, row: PlanRow) -> str:
    member, t = family.member(row.name), family.training
    lines = [f"GPT-NeoX config of stage {row.name} of family {family.name!r} ({plan.mode}), generated by",
             f"`neox-progressive generate-configs {family.path.name}`; edit the family file, not this one.",
             f"{row.tokens:,} budget tokens -> {row.train_iters} iterations x {row.global_batch} x {plan.seq_length} = "
             f"{row.realized_tokens:,} tokens; max LR {row.max_lr:.4g}."]
    if row.global_batch != member.global_batch:
        lines.append(f"Global batch {row.global_batch}, not the member's {member.global_batch}: budget.keep: updates (our "
                     f"reading) keeps the scratch run's {row.scratch_iters} updates and shrinks the batch.")
    if row.sample_order:
        segs = row.sample_order["segments"]
        lines.append(f"Fixed data, the paper's order: samples [0, {segs[0][1]:,}) are the rest of the first epoch, then "
                     "the second epoch, in this order only with the NeoX index maps that `prepare-data --family` or `run` "
                     "write beside the window dataset.")
    lines += [f"Not stated by the paper (our choices): init {t.init_method} / {t.output_layer_init_method}, min LR "
              f"{row.min_lr:.4g}, Adam eps {t.eps:g}, {member.num_kv_heads} KV heads of {member.num_heads}"
              f"{' (MHA)' if member.num_kv_heads == member.num_heads else ''}.",
              f"Run: python deepy.py train.py stage_{row.name}.yml  (on {row.num_gpus} GPU{'s' if row.num_gpus > 1 else ''})"]
    return "".join(f"# {line}\n" for line in lines)


def dump_stage(family: Family, plan: Plan, member_name: str, stage_dir: Path | None = None) -> str:
    """The text of `stage_<name>.yml` (typed values through yaml.safe_dump; floats read back as floats)."""
    cfg = stage_config(family, plan, member_name, stage_dir)
    return _header(family, plan, plan.row(member_name)) + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None, width=120)


def _write(path: Path, text: str | bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(text, bytes):
        tmp.write_bytes(text)
    else:
        tmp.write_text(text)
    tmp.replace(path)


def generate_configs(family: Family, out_dir: str | Path, mode: str | None = None, *, force: bool = True,
                     plot: bool = True) -> list[Path]:
    """Write `stage_<name>.yml` per member and `family_plan.{json,md,png}` into `out_dir`.

    Everything is generated and checked before anything is written. With `force=False` an existing
    file with other content is refused. Returns the paths written (the PNG only with matplotlib).
    """
    from neox_progressive.family.report import plan_json, plan_markdown, plan_png

    mode = mode or family.mode
    plan = plan_family(family, mode)
    if mode == "progressive":
        check_expansions(family)
    out_dir = Path(out_dir)
    files = {out_dir / f"stage_{m.name}.yml": dump_stage(family, plan, m.name, out_dir.resolve()) for m in family.members}
    independent = plan if mode == "independent" else plan_family(family, "independent")
    files[out_dir / "family_plan.json"] = json.dumps(plan_json(family, plan), indent=1) + "\n"
    files[out_dir / "family_plan.md"] = plan_markdown(family, plan, independent)
    if not force:
        for path, text in files.items():
            if path.exists() and path.read_text() != text:
                raise UserError(f"{path} exists with other content; pass --force to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        _write(path, text)
    written = list(files)
    if plot:
        png = plan_png(family, plan, independent, out_dir / "family_plan.png")
        if png is not None:
            written.append(png)
    return written
