"""Reading a family file into the dataclasses of `spec.py`: every key typed, unknown keys refused.

`load_family(path, overrides=None)` is the entry point; the format is documented in `spec.py` and
configs/neox/README.md. Every error is one line naming the file and the dotted key.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

from neox_progressive.config import ACTIVATIONS, GELU_APPROX, NORMS, POS_EMBS, read_yaml
from neox_progressive.errors import UserError
from neox_progressive.family.fields import Section
from neox_progressive.family.spec import (
    BUDGET_KEEP,
    FIXED_DATA_ORDERS,
    LR_RULES,
    LR_SCALE_BY,
    MODES,
    PATH_KEYS,
    Budget,
    Family,
    FamilyData,
    LRSpec,
    MemberSpec,
    ModelDefaults,
    Training,
    WandbSpec,
)


def _merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _path(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _model(s: Section) -> ModelDefaults:
    m = ModelDefaults(
        vocab_size=s.get("vocab_size", int, positive=True, example="50257"),
        seq_length=s.get("seq_length", int, positive=True, example="1024"),
        make_vocab_size_divisible_by=s.get("make_vocab_size_divisible_by", int, 128, positive=True),
        mlp_multiple_of=s.get("mlp_multiple_of", int, 1, positive=True),
        max_position_embeddings=s.get("max_position_embeddings", int, None, positive=True),
        rotary_pct=s.get("rotary_pct", float, 1.0), rotary_emb_base=s.get("rotary_emb_base", int, 10000, positive=True),
        rms_norm_eps=s.get("rms_norm_eps", float, 1.0e-5, positive=True), attn_bias=s.get("attn_bias", bool, False),
        mlp_bias=s.get("mlp_bias", bool, False), model_parallel_size=s.get("model_parallel_size", int, 1, positive=True),
        pipe_parallel_size=s.get("pipe_parallel_size", int, 1),
        norm=s.get("norm", str, "rmsnorm", choices=NORMS), layernorm_eps=s.get("layernorm_eps", float, 1.0e-5, positive=True),
        activation=s.get("activation", str, "swiglu", choices=ACTIVATIONS),
        gelu_approx=s.get("gelu_approx", str, "erf", choices=GELU_APPROX),
        parallel_residual=s.get("parallel_residual", bool, False), pos_emb=s.get("pos_emb", str, "rotary", choices=POS_EMBS),
    )
    s.done()
    for key, needs, value in (("gelu_approx", "activation: gelu", m.activation == "gelu"),
                              ("layernorm_eps", "norm: layernorm", m.norm == "layernorm"),
                              ("rms_norm_eps", "norm: rmsnorm", m.norm == "rmsnorm")):
        if s.has(key) and not value:
            raise s.fail(key, f"is only used with {needs}; remove it (this family has norm: {m.norm}, "
                              f"activation: {m.activation})")
    if m.max_position_embeddings is not None and m.max_position_embeddings < m.seq_length:
        raise s.fail("max_position_embeddings", f"{m.max_position_embeddings} < seq_length {m.seq_length}; NeoX refuses that")
    return m


def _init(s: Section, base: Path) -> dict:
    """`init: {hf: DIR, train: false}`: the member starts from a Hugging Face model (issue 12)."""
    if not s.has("init"):
        s.section("init")  # known key (also when null)
        return {}
    init = s.section("init")
    hf = init.get("hf", str, example="hf/TinyLlama-1.1B")
    train = init.get("train", bool, False)
    init.done()
    return {"init_hf": _path(hf, base), "init_train": train}


def _member(s: Section, model: ModelDefaults, base: Path) -> MemberSpec:
    kw = dict(
        name=str(s.get("name", (str, int, float), example="1B")),
        hidden_size=s.get("hidden_size", int, positive=True, example="2048"),
        ffn_size=s.get("ffn_size", int, positive=True, example="7168"),
        num_layers=s.get("num_layers", int, positive=True, example="18"),
        num_heads=s.get("num_heads", int, positive=True, example="16"),
        global_batch=s.get("global_batch", int, positive=True, example="960"),
        nominal_params=s.get("nominal_params", float, None, positive=True),
        scratch_tokens=s.get("scratch_tokens", int, None, positive=True),
        max_lr=s.get("max_lr", float, None, positive=True),
        micro_batch=s.get("micro_batch", int, None, positive=True),
        num_gpus=s.get("num_gpus", int, None, positive=True),
        model_parallel_size=s.get("model_parallel_size", int, None, positive=True),
        pipe_parallel_size=s.get("pipe_parallel_size", int, None),
    )
    kw["num_kv_heads"] = s.get("num_kv_heads", int, kw["num_heads"], positive=True)
    kw.update(_init(s, base))
    s.done()
    if not kw["name"].replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise s.fail("name", f"{kw['name']!r} must be letters, digits, '.', '-' or '_' (it names files and directories)")
    member = MemberSpec(model=model, **kw)
    try:
        member.shape()
    except UserError as exc:
        raise UserError(f"{s.file}: {s.where} ({kw['name']}): {exc}") from None
    try:
        member.shape().intermediate_size  # noqa: B018 (NeoX must be able to build this FFN width)
    except UserError as exc:
        raise UserError(f"{s.file}: {s.key('ffn_size')}: {exc} (model.mlp_multiple_of)") from None
    return member


def _budget(s: Section, members: list[MemberSpec]) -> Budget:
    b = Budget(tokens_per_param=s.get("tokens_per_param", float, None, positive=True),
               params=s.get("params", str, "computed", choices=("computed", "nominal")),
               fixed_data=s.get("fixed_data", bool, False), keep=s.get("keep", str, "batch", choices=BUDGET_KEEP),
               fixed_data_order=s.get("fixed_data_order", str, "epochs", choices=FIXED_DATA_ORDERS))
    s.done()
    if s.has("fixed_data_order") and not b.fixed_data:
        raise s.fail("fixed_data_order", "only applies with fixed_data: true (the order of a window that wraps); remove it")
    explicit = [m.name for m in members if m.scratch_tokens is not None]
    if b.tokens_per_param is None and len(explicit) != len(members):
        missing = [m.name for m in members if m.scratch_tokens is None]
        raise s.fail("tokens_per_param", f"missing, and members {missing} give no scratch_tokens; set "
                     "budget.tokens_per_param (Chinchilla: 20) or scratch_tokens on every member")
    if b.tokens_per_param is not None and explicit:
        raise s.fail("tokens_per_param", f"is set but members {explicit} also give scratch_tokens; use one of the two")
    if b.params == "nominal":
        missing = [m.name for m in members if m.nominal_params is None]
        if missing:
            raise s.fail("params", f"nominal, but members {missing} have no nominal_params (e.g. nominal_params: 1.0e9)")
    return b


def _lr(s: Section, members: list[MemberSpec]) -> LRSpec:
    lr = LRSpec(rule=s.get("rule", str, "fixed", choices=LR_RULES), by=s.get("by", str, "params", choices=LR_SCALE_BY),
                max=s.get("max", float, None, positive=True),
                smallest=s.get("smallest", float, None, positive=True), largest=s.get("largest", float, None, positive=True),
                min_ratio=s.get("min_ratio", float, None), min=s.get("min", float, None),
                warmup=s.get("warmup", float, 0.01), decay_style=s.get("decay_style", str, "cosine",
                                                                       choices=("cosine", "linear", "constant", "exponential")))
    s.done()
    need = {"fixed": ["max"], "size_scaled": ["smallest", "largest"], "per_member": []}[lr.rule]
    for key in need:
        if getattr(lr, key) is None:
            raise s.fail(key, f"missing; lr rule {lr.rule!r} needs {need} (e.g. {key}: 3.0e-4)")
    if s.has("by") and lr.rule != "size_scaled":
        raise s.fail("by", "only applies to rule size_scaled (how the max LR scales between members); remove it")
    unused = [k for k in ("max", "smallest", "largest") if k not in need and getattr(lr, k) is not None]
    if unused:
        raise s.fail(unused[0], f"is not used by lr rule {lr.rule!r} (it uses {need or 'each member max_lr'}); remove it")
    per = [m.name for m in members if m.max_lr is not None]
    if lr.rule == "per_member" and len(per) != len(members):
        raise s.fail("rule", f"per_member, but members {[m.name for m in members if m.max_lr is None]} have no max_lr")
    if lr.rule != "per_member" and per:
        raise s.fail("rule", f"{lr.rule!r}, but members {per} set max_lr; use rule: per_member or remove max_lr")
    if lr.min_ratio is not None and lr.min is not None:
        raise s.fail("min", "set either min (a value) or min_ratio (of each member's max LR), not both")
    if lr.min is None and lr.min_ratio is None:
        lr = LRSpec(**{**lr.__dict__, "min_ratio": 0.1})
    if lr.min_ratio is not None and not 0 <= lr.min_ratio <= 1:
        raise s.fail("min_ratio", f"must be in [0, 1], got {lr.min_ratio}")
    if not 0 <= lr.warmup < 1:
        raise s.fail("warmup", f"is NeoX's warmup fraction of lr_decay_iters, in [0, 1); got {lr.warmup}")
    return lr


def _training(s: Section, members: list[MemberSpec]) -> Training:
    lr = _lr(s.section("lr", required=True), members)
    betas = s.get("betas", list, [0.9, 0.95])
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas):
        raise s.fail("betas", f"expected two numbers like [0.9, 0.95], got {betas!r}")
    t = Training(
        num_gpus=s.get("num_gpus", int, positive=True, example="64"),
        micro_batch=s.get("micro_batch", int, positive=True, example="4"), lr=lr,
        precision=s.get("precision", str, "bfloat16", choices=("bfloat16", "fp16", "fp32")),
        zero_stage=s.get("zero_stage", int, 1, choices=(0, 1, 2, 3)), betas=(float(betas[0]), float(betas[1])),
        eps=s.get("eps", float, 1.0e-8, positive=True), weight_decay=s.get("weight_decay", float, 0.1),
        gradient_clipping=s.get("gradient_clipping", float, 1.0),
        checkpoint_interval=s.get("checkpoint_interval", int, 1000, positive=True),
        eval_interval=s.get("eval_interval", int, 1000, positive=True), eval_iters=s.get("eval_iters", int, 10),
        log_interval=s.get("log_interval", int, 10, positive=True), seed=s.get("seed", int, 1234),
        init_method=s.get("init_method", str, "small_init"),
        output_layer_init_method=s.get("output_layer_init_method", str, "wang_init"),
    )
    s.done()
    return t


def _prepare(s: Section, base: Path) -> dict:
    """The source of the training stream for `prepare-data` (its options, by the same names)."""
    out = {"inputs": s.get("inputs", list, None), "stdlib_corpus": s.get("stdlib_corpus", int, None, positive=True),
           "jsonl_key": s.get("jsonl_key", str, None), "tokenizer": s.get("tokenizer", str, None),
           "vocab_size": s.get("vocab_size", int, None, positive=True),
           "spm_model_type": s.get("spm_model_type", str, None, choices=("bpe", "unigram")),
           "eod_token": s.get("eod_token", str, None), "no_eod": s.get("no_eod", bool, None),
           "valid_fraction": s.get("valid_fraction", float, None)}
    s.done()
    if out["inputs"] is not None:
        out["inputs"] = [_path(str(p), base) for p in out["inputs"]]
    if out["tokenizer"] is not None:
        out["tokenizer"] = _path(out["tokenizer"], base)
    return {k: v for k, v in out.items() if v is not None}


def _data(s: Section, base: Path) -> FamilyData:
    d = FamilyData(train=_path(s.get("train", str, example="/data/fineweb/train_text_document"), base),
                 valid=_path(s.get("valid", str, example="/data/fineweb/valid_text_document"), base),
                 test=s.get("test", str, None), prepare=_prepare(s.section("prepare"), base))
    s.done()
    if d.test is not None:
        d = FamilyData(d.train, d.valid, _path(d.test, base), d.prepare)
    return d


def _expansion(s: Section) -> dict:
    """The `expansion:` block, validated by the expansion's own options (ExpandOptions)."""
    from dataclasses import asdict

    from neox_progressive.expand.options import ExpandOptions

    try:
        return asdict(ExpandOptions.from_dict(dict(s.data)))
    except UserError as exc:
        raise UserError(f"{s.file}: {s.where}: {exc}") from None


def _eval(s: Section) -> dict:
    from dataclasses import fields

    from neox_progressive.eval.settings import EvalSettings
    for f in fields(EvalSettings):
        if f.name != "quiet":
            s.raw(f.name)
    s.get("enabled", bool, True)  # the runner's: evaluate after training
    s.get("example_tasks", bool, False)  # the runner's: add the built-in example lm-eval tasks
    s.get("neox_kl_hook", bool, False)  # stages k > 1 log their KL to member k-1 in NeoX (patch 0003)
    s.done()
    return dict(s.data)


def _members(top: Section, model: ModelDefaults, base: Path) -> list[MemberSpec]:
    raw = top.raw("members")
    if not isinstance(raw, list) or len(raw) < 1:
        raise top.fail("members", f"expected a list of members (smallest first), got {raw!r}")
    members = [_member(Section(m, f"members[{i}]", top.file), model, base) for i, m in enumerate(raw)]
    for i, m in enumerate(members[1:], 1):
        if m.init_hf:
            raise UserError(f"{top.file}: members[{i}].init: only the first member can start from a Hugging Face model "
                            "(the others start from the expansion of the member before); remove it")
    names = [m.name for m in members]
    if len(set(names)) != len(names):
        raise top.fail("members", f"member names must be unique, got {names}")
    return members


def _check_order(family: Family) -> None:
    """Members grow: more parameters, and no dimension smaller than the member before (expansion only grows)."""
    from neox_progressive.family.budget import member_params
    for a, b in zip(family.members, family.members[1:]):
        for dim in ("hidden_size", "ffn_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(b, dim) < getattr(a, dim):
                raise UserError(f"{family.path}: member {b.name} has {dim} {getattr(b, dim)} < {getattr(a, dim)} of {a.name}; "
                                "expansion grows a model (wider and deeper): list members smallest first")
    prev = None
    for m in family.members:
        n = member_params(family, m)
        if prev is not None and n <= prev[1]:
            raise UserError(f"{family.path}: members must grow: {m.name} has {n:.4g} parameters, not more than "
                            f"{prev[0]} ({prev[1]:.4g}); list members smallest first")
        prev = (m.name, n)


def load_family(path: str | Path, overrides: Mapping | None = None) -> Family:
    """Read and check a family file; `overrides` (a nested dict) is merged into it first.

    Raises UserError (one line, naming the file and key) for any problem.
    """
    path = Path(path)
    raw = read_yaml(path)
    if overrides:
        raw = _merge(raw, overrides)
    file, base = str(path), path.absolute().parent  # not resolve(): a symlinked family file keeps its own dir
    top = Section(raw, "", file)
    model = _model(top.section("model", required=True))
    members = _members(top, model, base)
    shared = top.get("shared", dict, {})
    shared = {k.replace("-", "_"): (_path(v, base) if k in PATH_KEYS and isinstance(v, str) else v) for k, v in shared.items()}
    wb = top.section("wandb")
    wandb = WandbSpec(enabled=wb.get("enabled", bool, False), project=wb.get("project", str, None),
                      group=wb.get("group", str, None), team=wb.get("team", str, None), host=wb.get("host", str, None),
                      neox_exact_group=wb.get("neox_exact_group", bool, False))
    wb.done()
    family = Family(
        name=str(top.get("name", str, example="my_family")), path=path,
        mode=top.get("mode", str, "progressive", choices=MODES),
        output_dir=Path(_path(top.get("output_dir", str, example="/checkpoints/my_family"), base)),
        model=model, members=members, budget=_budget(top.section("budget", required=True), members),
        training=_training(top.section("training", required=True), members),
        data=_data(top.section("data", required=True), base), wandb=wandb,
        expansion=_expansion(top.section("expansion")), eval=_eval(top.section("eval")), shared=shared,
    )
    top.done()
    _check_order(family)
    from neox_progressive.family.stages import check_shared
    check_shared(family)
    return family
