"""The pure planner of an expansion: shapes and options in, every map and byte count out.

`plan_expansion(src, dst, options, stage)` checks everything the expansion needs before any
tensor is read (EXPANSION_SPEC sections 2, 4, 7; issue 4 "Requirements"), builds every unit map
(maps.py) and the depth order, and lists every target tensor as a `TensorOp`: its rule (the role
of its key in `arch.LAYER_ROLES` / `arch.MODEL_ROLES`), source keys, maps, shape and bytes. The
executor (run.py) only follows that list, and `--dry-run` prints it. The plan also says whether
the expansion is exact (function preserving) and why. Nothing here allocates weights, so the real
family shapes plan in well under a second.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from neox_progressive import arch
from neox_progressive.config import ModelShape, pad_vocab
from neox_progressive.errors import UserError
from neox_progressive.expand import maps
from neox_progressive.expand.options import DEFAULT_OPTIONS, ExpandOptions

DTYPE_BYTES = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class TensorOp:
    """One target tensor: `RULES[rule]` applied to the source tensors `sources` with the maps `maps`."""

    key: str
    """Target logical key, e.g. ``layers.3.attn.q.weight``."""
    rule: str
    sources: tuple[str, ...]
    """Source logical keys: layer l's tensor, and under AKI layer l+1's when the rule reads it."""
    maps: tuple[str, ...]
    """Names of the maps the rule reads (as in `expansion_maps.npz`): "hidden", "layer<l>.heads", ..."""
    shape: tuple[int, ...]
    bytes: int

    @property
    def units(self) -> str | None:
        return self.maps[1] if len(self.maps) > 1 else None

    @property
    def compute(self) -> tuple:
        """What the value depends on (target layers that copy one source layer share it)."""
        return self.rule, self.sources, self.maps

    def to_dict(self) -> dict:
        return {"key": self.key, "rule": self.rule, "sources": list(self.sources), "maps": list(self.maps),
                "shape": list(self.shape), "bytes": self.bytes}


@dataclass(frozen=True)
class LayerMaps:
    """Unit maps of one source layer (indices into the source layer's units)."""

    heads: np.ndarray
    kv_heads: np.ndarray
    ffn: np.ndarray


@dataclass
class ExpansionPlan:
    src: ModelShape
    dst: ModelShape
    options: ExpandOptions
    stage: str
    rms_comp: str
    gqa_layout: str
    hidden: np.ndarray
    """g_h, one map for the whole model (the residual stream is shared)."""
    layers: list[LayerMaps]
    """Per source layer."""
    order: list[int]
    """Target layer t copies widened source layer order[t]."""
    added: list[bool]
    dtype: str
    exact: bool = False
    """True when the expansion is function preserving (in exact arithmetic); `exact_reason` says why or why not."""
    exact_reason: str = ""
    tensors: list[TensorOp] = field(default_factory=list)
    """Every target tensor, in writing order."""
    file_bytes: dict[int, int] = field(default_factory=dict)
    """NeoX layer-file index -> bytes of all its TP-rank files (tensor data)."""

    @property
    def total_bytes(self) -> int:
        return sum(self.file_bytes.values())

    def alpha(self) -> np.ndarray:
        """Residual scale a_k of every target hidden unit (1 unless rms_comp is exact), float64."""
        if self.rms_comp != "exact":
            return np.ones(self.dst.hidden_size)
        c = maps.counts(self.hidden, self.src.hidden_size)
        ratio = self.dst.hidden_size / self.src.hidden_size
        return np.sqrt(ratio / c[self.hidden])

    def targets_of(self, source_layer: int) -> list[int]:
        return [t for t, s in enumerate(self.order) if s == source_layer]

    def layer_ops(self, target_layer: int) -> list[TensorOp]:
        prefix = f"layers.{target_layer}."
        return [op for op in self.tensors if op.key.startswith(prefix)]

    def model_ops(self) -> dict[str, TensorOp]:
        """The tensors outside the transformer layers (embeddings, final norm, head), by key."""
        return {op.key: op for op in self.tensors if not op.key.startswith("layers.")}

    def maps_arrays(self) -> dict[str, np.ndarray]:
        """Every map as a named array (the `expansion_maps.npz` sidecar)."""
        out = {"hidden": self.hidden, "depth_order": np.asarray(self.order, dtype=np.int64)}
        for i, m in enumerate(self.layers):
            out[f"layer{i}.heads"] = m.heads
            out[f"layer{i}.kv_heads"] = m.kv_heads
            out[f"layer{i}.ffn"] = m.ffn
        return out

    def summary(self) -> dict:
        s, d = self.src, self.dst
        return {
            "source": _shape_record(s), "target": _shape_record(d),
            "method": self.options.method, "options": self.options.to_dict() | {"rms_comp": self.rms_comp},
            "stage": self.stage, "exact": self.exact, "exact_reason": self.exact_reason,
            "gqa_layout": self.gqa_layout,
            "depth_order": self.order, "added_layers": [t for t, a in enumerate(self.added) if a],
            "dtype": self.dtype, "target_params": d.param_count(), "target_bytes": self.total_bytes,
            "largest_file_bytes": max(self.file_bytes.values()),
            "largest_layer_file_bytes": self.file_bytes[arch.layer_index(0)],
            "tensors": [op.to_dict() for op in self.tensors],
        }

    def describe(self) -> str:
        """Human-readable plan (the `--dry-run` output)."""
        s, d, o = self.src, self.dst, self.options
        gib = 1 << 30
        rows = [
            f"expansion plan ({o.method}, stage {self.stage!r}, seed {o.seed})",
            f"  {'':12}{'source':>14}{'target':>14}",
        ]
        for name, a, b in [("hidden", s.hidden_size, d.hidden_size), ("layers", s.num_layers, d.num_layers),
                           ("heads", s.num_heads, d.num_heads), ("kv heads", s.num_kv_heads, d.num_kv_heads),
                           ("head_dim", s.head_dim, d.head_dim), ("ffn", s.ffn_size, d.ffn_size),
                           ("vocab rows", s.padded_vocab_size, d.padded_vocab_size), ("TP", s.tp, d.tp),
                           ("format", _fmt(s), _fmt(d)), ("params", s.param_count(), d.param_count())]:
            rows.append(f"  {name:12}{a:>14,}{b:>14,}" if isinstance(a, int) else f"  {name:12}{a:>14}{b:>14}")
        rows.append(f"  options: depth_rule={o.depth_rule} new_layer_init={o.new_layer_init} rms_comp={self.rms_comp} "
                    f"map_sampling={o.map_sampling} gqa_layout={self.gqa_layout} aki_second={o.aki_second} "
                    f"aki_hidden={o.aki_hidden}")
        rows.append(f"  depth order: {self.order}")
        new_h = int((~_first(self.hidden)).sum())
        rows.append(f"  hidden map: {new_h} new units drawn; FFN: {d.ffn_size - s.ffn_size} new per layer; "
                    f"heads: {d.num_heads - s.num_heads} new per layer")
        rows.append(f"  output: {len(self.file_bytes)} layer files x TP {d.tp}, {self.total_bytes:,} bytes "
                    f"({self.total_bytes / gib:.2f} GiB, {self.dtype}); largest file "
                    f"{max(self.file_bytes.values()) / gib:.3f} GiB; one transformer layer "
                    f"{self.file_bytes[arch.layer_index(0)] / gib:.3f} GiB")
        rows.append(f"  exact: {'yes' if self.exact else 'NO'}: {self.exact_reason}")
        rows += self.describe_tensors()
        return "\n".join(rows)

    def describe_tensors(self) -> list[str]:
        """The tensor list, readable: the model-level tensors, one target layer's rules, then each layer's sources."""
        def line(op: TensorOp, key: str) -> str:
            shape = "x".join(map(str, op.shape))
            return f"    {key:28}{op.rule:18}{', '.join(op.maps):24}{shape:>14}{op.bytes:>16,}"

        model = self.model_ops()
        rows = [f"  tensors ({len(self.tensors)}; rule, maps, target shape, bytes in {self.dtype}):"]
        first = arch.logical_part_keys("embed", self.dst)
        rows += [line(op, key) for key, op in model.items() if key in first]
        for op in self.layer_ops(0):
            generic = TensorOp(op.key, op.rule, op.sources, tuple(m.replace("layer0.", "layer<s>.") for m in op.maps),
                               op.shape, op.bytes)
            rows.append(line(generic, "layers.T." + op.key.split(".", 2)[2]))
        rows += [line(op, key) for key, op in model.items() if key not in first]
        rows.append("  target layer T <- source layer s (+ s+1: AKI's upper layer; maps of s):")
        parts = []
        for t in range(self.dst.num_layers):
            ops = self.layer_ops(t)
            layers = sorted({int(k.split(".")[1]) for op in ops for k in op.sources})
            zero = " zero writers" if any(op.rule == "zero_writer" for op in ops) else ""
            parts.append(f"{t}<-{'+'.join(map(str, layers))}{zero}")
        for i in range(0, len(parts), 8):
            rows.append("    " + "  ".join(parts[i:i + 8]))
        return rows


def _first(g: np.ndarray) -> np.ndarray:
    return ~maps.new_units(g)


def _fmt(s: ModelShape) -> str:
    return "sequential" if s.sequential else "pipeline"


def _shape_record(s: ModelShape) -> dict:
    return dataclasses.asdict(s)


# ---- checks ----------------------------------------------------------------------------------
def target_vocab(src: ModelShape, dst: ModelShape) -> ModelShape:
    """The target shape with its padded vocab: the source's vocab, re-padded for the target's TP."""
    if src.padded_vocab_size is None:
        raise UserError("the source vocab size is unknown: pass the source checkpoint, or a config whose tokenizer file exists")
    if src.vocab_size and dst.vocab_size and src.vocab_size != dst.vocab_size:
        raise UserError(f"vocab: the source tokenizer has {src.vocab_size} tokens but the target's has {dst.vocab_size}; "
                        "expansion keeps the vocabulary: use the same tokenizer in both configs")
    if dst.vocab_size and not src.vocab_size and \
            pad_vocab(dst.vocab_size, src.make_vocab_size_divisible_by, src.tp) != src.padded_vocab_size:
        raise UserError(f"vocab: the target's tokenizer has {dst.vocab_size} tokens, but the source checkpoint has "
                        f"{src.padded_vocab_size} embedding rows (its config pads to multiples of "
                        f"{src.make_vocab_size_divisible_by * src.tp}), so it was trained on another vocabulary; expansion "
                        "keeps the vocabulary: give the target the source's tokenizer")
    base = dst.vocab_size or src.vocab_size or src.padded_vocab_size
    padded = pad_vocab(base, dst.make_vocab_size_divisible_by, dst.tp)
    if padded < src.padded_vocab_size and not (src.vocab_size and src.vocab_size <= padded):
        raise UserError(f"vocab: the target pads to {padded} rows, fewer than the source's {src.padded_vocab_size}; "
                        "set make_vocab_size_divisible_by in the target config so that the rows do not shrink")
    return dst.replace(padded_vocab_size=padded, vocab_size=dst.vocab_size or src.vocab_size)


# (NeoX config key, ModelShape field) that source and target must share: the architecture itself
ARCHITECTURE_KEYS = [("norm", "norm"), ("activation", "activation"), ("gpt_j_residual", "parallel_residual"),
                     ("pos_emb", "pos_emb"), ("use_bias_in_attn_linear", "attn_bias"), ("use_bias_in_mlp", "mlp_bias")]
CONDITIONAL_KEYS = [
    ("bias_gelu_fusion (the GeLU flavour: tanh or erf)", "gelu_approx", lambda s: s.activation == "gelu"),
    ("rotary_pct", "rotary_pct", lambda s: s.pos_emb == "rotary"),
    ("rotary_emb_base", "rotary_emb_base", lambda s: s.pos_emb == "rotary"),
    ("rms_norm_epsilon", "rms_norm_eps", lambda s: s.norm == "rmsnorm"),
    ("layernorm_epsilon", "layernorm_eps", lambda s: s.norm == "layernorm"),
    ("max_position_embeddings (the rows of the learned position table)", "max_position_embeddings",
     lambda s: s.pos_emb == "learned"),
]


def check_shapes(src: ModelShape, dst: ModelShape) -> None:
    """One-line UserErrors for every pair of shapes the expansion cannot map."""
    for name, key in [("hidden_size", "hidden_size"), ("num_layers", "num_layers"),
                      ("num_attention_heads", "num_heads"), ("FFN width (intermediate_size / 3)", "ffn_size")]:
        a, b = getattr(src, key), getattr(dst, key)
        if b < a:
            raise UserError(f"{name}: the target's {b} is smaller than the source's {a}; expansion only grows a model: "
                            f"use a target config with {name} >= {a}")
    if src.head_dim != dst.head_dim:
        fix = (f"num_attention_heads: {dst.hidden_size // src.head_dim}" if dst.hidden_size % src.head_dim == 0 else
               f"a hidden_size that is a multiple of {src.head_dim}, with hidden_size / {src.head_dim} heads")
        raise UserError(f"head_dim: source {src.hidden_size}/{src.num_heads} = {src.head_dim}, target "
                        f"{dst.hidden_size}/{dst.num_heads} = {dst.head_dim}; heads are copied whole, so head_dim must "
                        f"stay: use {fix} in the target")
    for name, key in ARCHITECTURE_KEYS + [(n, k) for n, k, when in CONDITIONAL_KEYS if when(src) or when(dst)]:
        a, b = getattr(src, key), getattr(dst, key)
        if a != b:
            kind = (f" (the source is {src.architecture}, the target {dst.architecture})"
                    if src.architecture != dst.architecture else "")
            raise UserError(f"{name}: source {a!r}, target {b!r}; expansion keeps the architecture{kind}: set "
                            f"{name}: {a!r} in the target config")


def plan_expansion(src: ModelShape, dst: ModelShape, options: ExpandOptions = DEFAULT_OPTIONS, stage: str = "",
                   dtype: str | None = None) -> ExpansionPlan:
    """Check the pair of shapes and build every map (pure: no tensors)."""
    dst = target_vocab(src, dst)
    check_shapes(src, dst)
    layout = maps.gqa_layout(src.num_heads, src.num_kv_heads, dst.num_heads, dst.num_kv_heads, options.gqa_layout)
    kw = dict(sampling=options.map_sampling, seed=options.seed, stage=stage)
    hidden = maps.unit_map(src.hidden_size, dst.hidden_size, kind="hidden", layer="model", **kw)
    layers = []
    for i in range(src.num_layers):
        g_h, g_kv = maps.head_maps(src.num_heads, src.num_kv_heads, dst.num_heads, dst.num_kv_heads, layout,
                                   layer=i, **kw)
        g_f = maps.unit_map(src.ffn_size, dst.ffn_size, kind="ffn", layer=i, **kw)
        layers.append(LayerMaps(g_h, g_kv, g_f))
    order = maps.depth_order(src.num_layers, dst.num_layers, options.depth_rule)
    dtype = dtype or src.params_dtype
    if dtype not in DTYPE_BYTES:
        raise UserError(f"source dtype {dtype} is not supported; expected one of {', '.join(DTYPE_BYTES)}")
    rms_comp = resolve_rms_comp(src, options)
    added = maps.added_layers(order)
    exact, why = exactness(src, dst, options, rms_comp, hidden, added)
    plan = ExpansionPlan(src, dst, options, stage, rms_comp, layout, hidden, layers, order, added, dtype, exact, why)
    plan.tensors = tensor_ops(plan)
    plan.file_bytes = {index: dst.tp * sum(int(np.prod(s)) for s in keys.values()) * DTYPE_BYTES[dtype]
                       for index, keys in arch.neox_file_shapes(dst).items()}
    return plan


# ---- the tensor list -------------------------------------------------------------------------
def _reads_upper(rule: str, options: ExpandOptions, new_units: bool, new_hidden: bool) -> bool:
    """Whether a rule reads source layer l+1 (AKI): the rows of new units, and what the two switches take."""
    if options.method != "aki":
        return False
    if rule in ("reads_hidden", "unit_bias"):
        return new_units
    if rule == "writes_residual":
        return (options.aki_second == "upper" and new_units) or (options.aki_hidden == "upper" and new_hidden)
    return rule == "residual_bias" and options.aki_hidden == "upper" and new_hidden


def tensor_ops(plan: ExpansionPlan) -> list[TensorOp]:
    """Every target tensor of the plan: roles from `arch`, depth order, AKI's upper layer, zero_out."""
    dst, opt, size = plan.dst, plan.options, DTYPE_BYTES[plan.dtype]

    def op(key, rule, sources, units, shape):
        return TensorOp(key, rule, tuple(sources), ("hidden",) + ((units,) if units else ()), tuple(shape),
                        int(np.prod(shape)) * size)

    model_shapes = arch.logical_global_shapes(dst)

    def part_ops(part):
        return [op(k, arch.MODEL_ROLES[k].rule, [k], None, model_shapes[k]) for k in arch.logical_part_keys(part, dst)]

    out = part_ops("embed")
    shapes = arch.logical_layer_shapes(dst)
    new_hidden = bool(maps.new_units(plan.hidden).any())
    grows: dict[tuple[int, str], bool] = {}  # (source layer, units) -> the map has new units
    for t, s in enumerate(plan.order):
        zero = plan.added[t] and opt.new_layer_init == "zero_out"
        upper = s + 1 if s + 1 < plan.src.num_layers else None
        for key, shape in shapes.items():
            role = arch.LAYER_ROLES[key]
            rule = "zero_writer" if zero and key in arch.RESIDUAL_WRITERS else role.rule
            sources = [f"layers.{s}.{key}"]
            if role.units and (s, role.units) not in grows:
                grows[s, role.units] = bool(maps.new_units(getattr(plan.layers[s], role.units)).any())
            new_units = grows.get((s, role.units), False)
            if upper is not None and rule != "zero_writer" and _reads_upper(rule, opt, new_units, new_hidden):
                sources.append(f"layers.{upper}.{key}")
            out.append(op(f"layers.{t}.{key}", rule, sources, role.units and f"layer{s}.{role.units}", shape))
    return out + part_ops("final_norm") + part_ops("head")


# ---- rms_comp and exactness ------------------------------------------------------------------
def resolve_rms_comp(src: ModelShape, options: ExpandOptions) -> str:
    """`rms_comp` with its default filled in: exact for FPI of an RMSNorm model, none otherwise.

    LayerNorm: the residual rescaling of rms_comp=exact keeps the mean square but not the mean, so it
    cannot make a LayerNorm model exact (expand/rules.py derives it); it is refused, not silently
    applied.
    """
    if src.norm == "layernorm":
        if options.rms_comp == "exact":
            raise UserError("rms_comp exact: the residual rescaling keeps RMSNorm's mean square, but this model uses "
                            "LayerNorm, whose mean no rescaling keeps when map counts differ; use rms_comp none (FPI is "
                            "then exact at an integer width ratio with map_sampling balanced)")
        return "none"
    return options.resolved_rms_comp


def exactness(src: ModelShape, dst: ModelShape, options: ExpandOptions, rms_comp: str, hidden: np.ndarray,
              added: list[bool]) -> tuple[bool, str]:
    """(exact, reason): whether the expansion preserves the source's function in exact arithmetic."""
    grows = dst.num_heads > src.num_heads or dst.ffn_size > src.ffn_size
    if options.method == "aki" and src.num_layers > 1 and grows:
        return False, ("aki: new heads and FFN neurons take source layer l+1's weights (bert2BERT AKI is not "
                       "function preserving by design)")
    c = maps.counts(hidden, src.hidden_size)
    ratio = f"{src.hidden_size} -> {dst.hidden_size} (x{dst.hidden_size / src.hidden_size:.4g})"
    why = []
    if int(c.min()) != int(c.max()):
        if src.norm == "layernorm":
            why.append(f"LayerNorm under a hidden map with unequal counts, {ratio}, map_sampling {options.map_sampling}: "
                       "bert2BERT's approximation (exact needs an integer width ratio and map_sampling balanced)")
        elif rms_comp != "exact":
            why.append(f"RMSNorm under a hidden map with unequal counts, {ratio}, rms_comp none: the mean square "
                       "changes (rms_comp exact, or map_sampling balanced at an integer ratio, makes it exact)")
    if any(added) and options.new_layer_init == "copy":
        why.append("added layers are copies (new_layer_init copy); zero_out makes them the identity")
    if why:
        return False, "; ".join(why)
    how = "every hidden unit copied equally often" if int(c.min()) == int(c.max()) else "rms_comp exact"
    return True, f"function preserving ({options.method}; norms: {how}; heads whole, FFN and head columns / c)"
