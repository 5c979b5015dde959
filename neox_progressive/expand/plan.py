"""The pure planner of an expansion: shapes and options in, every map and byte count out.

`plan_expansion(src, dst, options, stage)` checks everything the expansion needs before any
tensor is read (EXPANSION_SPEC sections 2, 4, 7; issue 4 "Requirements") and builds every unit
map (maps.py) and the depth order. The executor (run.py) only follows the plan, and `--dry-run`
prints it. Nothing here allocates weights, so the real family shapes plan in well under a second.
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
            "method": self.options.method, "options": self.options.to_dict(), "stage": self.stage,
            "gqa_layout": self.gqa_layout,
            "depth_order": self.order, "added_layers": [t for t, a in enumerate(self.added) if a],
            "dtype": self.dtype, "target_params": d.param_count(), "target_bytes": self.total_bytes,
            "largest_file_bytes": max(self.file_bytes.values()),
            "largest_layer_file_bytes": self.file_bytes[arch.layer_index(0)],
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
        return "\n".join(rows)


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
    for name, key in [("use_bias_in_attn_linear", "attn_bias"), ("use_bias_in_mlp", "mlp_bias"),
                      ("rotary_pct", "rotary_pct"), ("rotary_emb_base", "rotary_emb_base"),
                      ("rms_norm_epsilon", "rms_norm_eps")]:
        a, b = getattr(src, key), getattr(dst, key)
        if a != b:
            raise UserError(f"{name}: source {a!r}, target {b!r}; expansion keeps the architecture: set {name}: {a!r} "
                            "in the target config")


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
    plan = ExpansionPlan(src, dst, options, stage, options.resolved_rms_comp, layout, hidden, layers, order,
                         maps.added_layers(order), dtype)
    plan.file_bytes = {index: dst.tp * sum(int(np.prod(s)) for s in keys.values()) * DTYPE_BYTES[dtype]
                       for index, keys in arch.neox_file_shapes(dst).items()}
    return plan
