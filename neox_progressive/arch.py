"""The GPT-NeoX weight layout of both architectures, as data plus a few fuse/shard functions.

Logical view (what the rest of the plugin works on): unsharded, unfused tensors with the
names of the reference model (`model.py`), e.g. ``embed.weight`` [V, h],
``layers.3.attn.q.weight`` [nh*d, h], ``layers.3.mlp.up.weight`` [F, h], ``head.weight``.
Which keys a model has follows from its `ModelShape` (norm, activation, biases, positions):

    per layer   attn_norm.weight [h]  attn_norm.bias [h] (LayerNorm)
                attn.{q,k,v}.weight [nh*d | nkv*d, h]  attn.o.weight [h, nh*d]  attn.{q,k,v,o}.bias
                mlp_norm.weight [h]  mlp_norm.bias [h] (LayerNorm)
                mlp.gate.weight [F, h] (SwiGLU only)  mlp.up.weight [F, h]  mlp.down.weight [h, F]
                mlp.{gate,up,down}.bias
    global      embed.weight [V, h]  pos_embed.weight [P, h] (learned positions)
                final_norm.weight [h]  final_norm.bias [h] (LayerNorm)  head.weight [V, h]

NeoX view (NEOX_FACTS.md sections 1-4 and 11, megatron/model/{gpt2_model,transformer,word_embeddings}.py):

    spec index  file          keys (per TP rank)
    0           layer_00      word_embeddings.weight [V/TP, h]; position_embeddings.weight [P, h]
                              (learned positions: a plain nn.Embedding, full on every rank)
    i + 2       layer_{i+2}   input_layernorm.{scale | weight, bias}        (replicated)
                              attention.query_key_value.weight  MHA: [3*np*d, h], rows per local
                                  head q_j, k_j, v_j (interleaved); GQA: [(np + 2*kvp)*d, h] = [Q_r|K_r|V_r]
                              attention.dense.weight [h, np*d] (row parallel)
                              post_attention_layernorm.{scale | weight, bias}
                              mlp.linear1.weight  SwiGLU: [2F/TP, h] = [up_r; gate_r]; GeLU: [F/TP, h]
                              mlp.linear2.weight [h, F/TP] (row parallel)
    L + 3       layer_{L+3}   norm.{scale | weight, bias}
    L + 4       layer_{L+4}   final_linear.weight [V/TP, h]

RMSNorm's parameter is `scale`, LayerNorm's `weight` and `bias` (norms.py). Column-parallel biases
are split like their weights. Row-parallel biases (dense, linear2) are full size on every rank; with
the sequential residual NeoX adds them once after the all-reduce, so every rank holds the logical bias.
With `gpt_j_residual` the sublayers skip their all-reduce (`parallel_output`) and each rank adds its
bias *before* the single all-reduce of attn + mlp (transformer.py), so the bias the model computes
is the sum over ranks: each rank holds logical / TP (NeoX's tools/ckpts/convert_hf_to_sequential.py
divides, convert_neox_to_hf.py sums; layout `row_bias`).

Older NeoX checkpoints (and convert_hf_to_sequential.py) name the plain MLP `mlp.dense_h_to_4h` /
`mlp.dense_4h_to_h`; `LEGACY_KEYS` maps them to today's names when reading.
`attention.rotary_emb.inv_freq` exists only when `rotary_save_freqs_buffer` is set (loading is
strict, so it must match the config).

Everything below is driven by the tables `LOGICAL_*` and `NEOX_PARTS`: a new tensor is a new row,
not a new branch. Each NeoX tensor names its logical tensors and a *layout* (how the logical
tensors become one TP rank's tensor and back).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from neox_progressive.config import ModelShape

QKV_WEIGHT = "attention.query_key_value.weight"
QKV_BIAS = "attention.query_key_value.bias"
DENSE_WEIGHT = "attention.dense.weight"
DENSE_BIAS = "attention.dense.bias"
LINEAR1_WEIGHT = "mlp.linear1.weight"
LINEAR1_BIAS = "mlp.linear1.bias"
LINEAR2_WEIGHT = "mlp.linear2.weight"
LINEAR2_BIAS = "mlp.linear2.bias"
INV_FREQ = "attention.rotary_emb.inv_freq"
EMBED_KEY = "word_embeddings.weight"
POS_EMBED_KEY = "position_embeddings.weight"
HEAD_KEY = "final_linear.weight"
FINAL_NORM_KEY = "norm.scale"
"""The Llama shape's final norm key (classic models: `norm.weight` and `norm.bias`)."""
NORM_PARAM = {"rmsnorm": "scale", "layernorm": "weight"}
"""The NeoX name of a norm's multiplicative parameter (`{norm}` in the key templates below)."""

# When a tensor exists: named predicates of the shape (the tables refer to them by name).
WHEN: dict[str, Callable[[ModelShape], bool]] = {
    "always": lambda s: True,
    "norm_bias": lambda s: s.norm_bias,
    "attn_bias": lambda s: s.attn_bias,
    "mlp_bias": lambda s: s.mlp_bias,
    "gated": lambda s: s.gated,
    "gated_bias": lambda s: s.gated and s.mlp_bias,
    "plain": lambda s: not s.gated,
    "plain_bias": lambda s: not s.gated and s.mlp_bias,
    "freqs_buffer": lambda s: s.rotary_save_freqs_buffer and s.pos_emb == "rotary",
    "learned_pos": lambda s: s.pos_emb == "learned",
}

# Logical tensors: key, dims (h hidden, q = nh*d, kv = nkv*d, f FFN, V vocab rows, P positions), when.
LOGICAL_LAYER = (
    ("attn_norm.weight", ("h",), "always"),
    ("attn_norm.bias", ("h",), "norm_bias"),
    ("attn.q.weight", ("q", "h"), "always"),
    ("attn.k.weight", ("kv", "h"), "always"),
    ("attn.v.weight", ("kv", "h"), "always"),
    ("attn.o.weight", ("h", "q"), "always"),
    ("attn.q.bias", ("q",), "attn_bias"),
    ("attn.k.bias", ("kv",), "attn_bias"),
    ("attn.v.bias", ("kv",), "attn_bias"),
    ("attn.o.bias", ("h",), "attn_bias"),
    ("mlp_norm.weight", ("h",), "always"),
    ("mlp_norm.bias", ("h",), "norm_bias"),
    ("mlp.gate.weight", ("f", "h"), "gated"),
    ("mlp.up.weight", ("f", "h"), "always"),
    ("mlp.down.weight", ("h", "f"), "always"),
    ("mlp.gate.bias", ("f",), "gated_bias"),
    ("mlp.up.bias", ("f",), "mlp_bias"),
    ("mlp.down.bias", ("h",), "mlp_bias"),
)
LOGICAL_GLOBAL = (
    ("embed.weight", ("V", "h"), "always"),
    ("pos_embed.weight", ("P", "h"), "learned_pos"),
    ("final_norm.weight", ("h",), "always"),
    ("final_norm.bias", ("h",), "norm_bias"),
    ("head.weight", ("V", "h"), "always"),
)

# NeoX tensors of each part (one layer file per part and TP rank): NeoX key template, the logical
# keys it holds, its TP layout (see LAYOUTS), when it exists. Row order = NeoX's state-dict order.
NEOX_PARTS = {
    "embed": (
        (EMBED_KEY, ("embed.weight",), "rows", "always"),
        (POS_EMBED_KEY, ("pos_embed.weight",), "replicated", "learned_pos"),
    ),
    "layer": (
        ("input_layernorm.{norm}", ("attn_norm.weight",), "replicated", "always"),
        ("input_layernorm.bias", ("attn_norm.bias",), "replicated", "norm_bias"),
        (QKV_WEIGHT, ("attn.q.weight", "attn.k.weight", "attn.v.weight"), "qkv", "always"),
        (QKV_BIAS, ("attn.q.bias", "attn.k.bias", "attn.v.bias"), "qkv", "attn_bias"),
        (INV_FREQ, (), "inv_freq", "freqs_buffer"),
        (DENSE_WEIGHT, ("attn.o.weight",), "cols", "always"),
        (DENSE_BIAS, ("attn.o.bias",), "row_bias", "attn_bias"),
        ("post_attention_layernorm.{norm}", ("mlp_norm.weight",), "replicated", "always"),
        ("post_attention_layernorm.bias", ("mlp_norm.bias",), "replicated", "norm_bias"),
        (LINEAR1_WEIGHT, ("mlp.up.weight", "mlp.gate.weight"), "gated_rows", "gated"),
        (LINEAR1_WEIGHT, ("mlp.up.weight",), "rows", "plain"),
        (LINEAR1_BIAS, ("mlp.up.bias", "mlp.gate.bias"), "gated_rows", "gated_bias"),
        (LINEAR1_BIAS, ("mlp.up.bias",), "rows", "plain_bias"),
        (LINEAR2_WEIGHT, ("mlp.down.weight",), "cols", "always"),
        (LINEAR2_BIAS, ("mlp.down.bias",), "row_bias", "mlp_bias"),
    ),
    "final_norm": (
        ("norm.{norm}", ("final_norm.weight",), "replicated", "always"),
        ("norm.bias", ("final_norm.bias",), "replicated", "norm_bias"),
    ),
    "head": (
        (HEAD_KEY, ("head.weight",), "rows", "always"),
    ),
}
GLOBAL_PARTS = ("embed", "final_norm", "head")
# Key names of older NeoX checkpoints (before the MLP was renamed linear1/linear2) -> today's names.
LEGACY_KEYS = {
    "mlp.dense_h_to_4h.weight": LINEAR1_WEIGHT, "mlp.dense_h_to_4h.bias": LINEAR1_BIAS,
    "mlp.dense_4h_to_h.weight": LINEAR2_WEIGHT, "mlp.dense_4h_to_h.bias": LINEAR2_BIAS,
}


@dataclass(frozen=True)
class NeoxTensor:
    """One tensor of a NeoX layer file, as it exists for a given shape."""

    key: str
    """NeoX state-dict key (without the `sequential.N.` prefix)."""
    logical: tuple[str, ...]
    """Logical keys it is made of (empty for buffers such as inv_freq)."""
    layout: str
    """Name in LAYOUTS: replicated | rows | cols | qkv | gated_rows | inv_freq."""


def neox_tensors(part: str, shape: ModelShape) -> list[NeoxTensor]:
    """The NeoX tensors of one part ('embed', 'layer', 'final_norm', 'head') of this shape."""
    norm = NORM_PARAM[shape.norm]
    return [NeoxTensor(key.format(norm=norm), logical, layout)
            for key, logical, layout, when in NEOX_PARTS[part] if WHEN[when](shape)]


def modern_keys(sd: dict[str, torch.Tensor], shape: ModelShape) -> dict[str, torch.Tensor]:
    """A layer state dict with `LEGACY_KEYS` renamed (plain GeLU MLPs only; others are returned as they are)."""
    if shape.gated or not any(k in LEGACY_KEYS for k in sd):
        return sd
    return {LEGACY_KEYS.get(k, k): v for k, v in sd.items()}


# ---- indices and file names --------------------------------------------------------------------
def embed_index() -> int:
    return 0


def layer_index(i: int) -> int:
    """NeoX pipeline spec index (and layer-file number) of transformer layer i."""
    return i + 2


def final_norm_index(num_layers: int) -> int:
    return num_layers + 3


def head_index(num_layers: int) -> int:
    return num_layers + 4


def part_index(part: str, shape: ModelShape, layer: int | None = None) -> int:
    """The layer-file index of a part (`layer` names the transformer layer for part 'layer')."""
    if part == "layer":
        return layer_index(layer)
    return {"embed": embed_index(), "final_norm": final_norm_index(shape.num_layers),
            "head": head_index(shape.num_layers)}[part]


def layer_file_name(index: int, tp_rank: int) -> str:
    """`layer_XX-model_TT-model_states.pt` (DeepSpeed pipe/module.py; 3 digits from 100)."""
    return f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"


def mp_rank_file_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


# ---- logical keys and shapes -------------------------------------------------------------------
def _dims(shape: ModelShape) -> dict[str, int | None]:
    d = shape.head_dim
    return {"h": shape.hidden_size, "q": shape.num_heads * d, "kv": shape.num_kv_heads * d, "f": shape.ffn_size,
            "V": shape.padded_vocab_size, "P": shape.max_position_embeddings}


def _shapes(table, shape: ModelShape) -> dict[str, tuple[int, ...]]:
    dims = _dims(shape)
    return {key: tuple(dims[x] if dims[x] is not None else -1 for x in sym)
            for key, sym, when in table if WHEN[when](shape)}


def logical_layer_keys(shape: ModelShape) -> list[str]:
    """The logical keys of one transformer layer, in a fixed order."""
    return [key for key, _, when in LOGICAL_LAYER if WHEN[when](shape)]


def logical_layer_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    return _shapes(LOGICAL_LAYER, shape)


def logical_global_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Logical keys and shapes outside the layers (vocab rows -1 while unknown)."""
    return _shapes(LOGICAL_GLOBAL, shape)


def logical_part_keys(part: str, shape: ModelShape) -> list[str]:
    """The logical keys of a part, in order ('layer': unprefixed per-layer keys)."""
    return [k for t in neox_tensors(part, shape) for k in t.logical]


def logical_keys(shape: ModelShape) -> list[str]:
    """Every logical key of the whole model (the reference model's state-dict keys), in file order."""
    layer = logical_layer_keys(shape)
    return [*logical_part_keys("embed", shape),
            *(f"layers.{i}.{k}" for i in range(shape.num_layers) for k in layer),
            *logical_part_keys("final_norm", shape), *logical_part_keys("head", shape)]


# ---- layouts: logical tensors <-> one TP rank's tensor ------------------------------------------
def rotary_inv_freq(shape: ModelShape) -> torch.Tensor:
    dim = shape.rotary_dims
    return 1.0 / (shape.rotary_emb_base ** (torch.arange(0, dim, 2).float() / dim))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape, rank: int) -> torch.Tensor:
    """One TP rank's `query_key_value` rows (weight [*, h] or bias [*]) from logical q, k, v."""
    d, tp = shape.head_dim, shape.tp
    np_, kvp = shape.num_heads // tp, shape.num_kv_heads // tp
    tail = q.shape[1:]
    qh = q.reshape(shape.num_heads, d, *tail)[rank * np_:(rank + 1) * np_]      # (np, d, ...)
    kh = k.reshape(shape.num_kv_heads, d, *tail)[rank * kvp:(rank + 1) * kvp]   # (kvp, d, ...)
    vh = v.reshape(shape.num_kv_heads, d, *tail)[rank * kvp:(rank + 1) * kvp]
    if not shape.gqa:
        # MHA: view(np, 3*d) in NeoX -> rows ordered (head, {q,k,v}, d)
        return torch.stack([qh, kh, vh], dim=1).reshape(np_ * 3 * d, *tail)      # (np*3*d, ...)
    return torch.cat([qh.reshape(np_ * d, *tail), kh.reshape(kvp * d, *tail), vh.reshape(kvp * d, *tail)])


def unfuse_qkv(ranks: list[torch.Tensor], shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logical (q, k, v) from every TP rank's `query_key_value` tensor."""
    d, tp = shape.head_dim, shape.tp
    np_, kvp = shape.num_heads // tp, shape.num_kv_heads // tp
    qs, ks, vs = [], [], []
    for t in ranks:
        tail = t.shape[1:]
        if not shape.gqa:
            parts = t.reshape(np_, 3, d, *tail)                                  # (np, 3, d, ...)
            qs.append(parts[:, 0].reshape(np_ * d, *tail))
            ks.append(parts[:, 1].reshape(np_ * d, *tail))
            vs.append(parts[:, 2].reshape(np_ * d, *tail))
        else:
            q, k, v = torch.split(t, [np_ * d, kvp * d, kvp * d])
            qs.append(q)
            ks.append(k)
            vs.append(v)
    return torch.cat(qs), torch.cat(ks), torch.cat(vs)


def fuse_linear1(up: torch.Tensor, gate: torch.Tensor, shape: ModelShape, rank: int) -> torch.Tensor:
    """SwiGLU linear1 of one rank = [up_r; gate_r]."""
    n = shape.ffn_size // shape.tp
    return torch.cat([up[rank * n:(rank + 1) * n], gate[rank * n:(rank + 1) * n]])


def unfuse_linear1(ranks: list[torch.Tensor], shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical (up, gate); NeoX's Gated_Activation takes chunk 0 as x (up), chunk 1 as gate."""
    ups, gates = zip(*(t.chunk(2, dim=0) for t in ranks))
    return torch.cat(ups), torch.cat(gates)


def _own(t: torch.Tensor) -> torch.Tensor:
    """`t` as torch.save should get it: contiguous and owning exactly its storage (torch.save writes a
    view's whole base storage, so views are cloned; tensors that already own their storage are not copied)."""
    t = t.contiguous()
    if t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone()


def _rows(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    n = t.shape[0] // tp
    return t[rank * n:(rank + 1) * n]


def _cols(t: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    n = t.shape[1] // tp
    return t[:, rank * n:(rank + 1) * n]


@dataclass(frozen=True)
class Layout:
    """How logical tensors become one TP rank's NeoX tensor (`split`) and back (`join`)."""

    split: Callable  # (logical tensors, shape, rank, dtype) -> rank tensor
    join: Callable   # (rank tensors, shape) -> logical tensors
    rank_shape: Callable  # (logical shapes, shape) -> rank shape


LAYOUTS = {
    "replicated": Layout(lambda ts, s, r, dt: ts[0], lambda rs, s: (rs[0],), lambda ss, s: ss[0]),
    "rows": Layout(lambda ts, s, r, dt: _rows(ts[0], s.tp, r), lambda rs, s: (torch.cat(rs),),
                   lambda ss, s: (ss[0][0] // s.tp if ss[0][0] > 0 else -1, *ss[0][1:])),
    "cols": Layout(lambda ts, s, r, dt: _cols(ts[0], s.tp, r), lambda rs, s: (torch.cat(rs, dim=1),),
                   lambda ss, s: (ss[0][0], ss[0][1] // s.tp)),
    "qkv": Layout(lambda ts, s, r, dt: fuse_qkv(*ts, s, r), unfuse_qkv,
                  lambda ss, s: (sum(x[0] for x in ss) // s.tp, *ss[0][1:])),
    "gated_rows": Layout(lambda ts, s, r, dt: fuse_linear1(*ts, s, r), unfuse_linear1,
                         lambda ss, s: (sum(x[0] for x in ss) // s.tp, *ss[0][1:])),
    "row_bias": Layout(lambda ts, s, r, dt: ts[0] / s.tp if s.parallel_residual else ts[0],
                       lambda rs, s: (sum(rs[1:], rs[0]) if s.parallel_residual else rs[0],), lambda ss, s: ss[0]),
    "inv_freq": Layout(lambda ts, s, r, dt: rotary_inv_freq(s).to(dt), lambda rs, s: (),
                       lambda ss, s: (s.rotary_dims // 2,)),
}


# ---- whole parts -------------------------------------------------------------------------------
def _logical_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    return {**logical_layer_shapes(shape), **logical_global_shapes(shape)}


def neox_part_shapes(part: str, shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Per-TP-rank NeoX keys and shapes of one part's file (the strict-load key set)."""
    logical = _logical_shapes(shape)
    return {t.key: tuple(LAYOUTS[t.layout].rank_shape([logical[k] for k in t.logical], shape))
            for t in neox_tensors(part, shape)}


def neox_layer_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Per-TP-rank NeoX keys and shapes of one transformer layer file (strict-load key set)."""
    return neox_part_shapes("layer", shape)


def part_to_neox(part: str, tensors: dict[str, torch.Tensor], shape: ModelShape) -> list[dict[str, torch.Tensor]]:
    """Logical tensors of a part -> one NeoX state dict per TP rank (contiguous, key order as NeoX)."""
    dtype = next(iter(tensors.values())).dtype
    specs = neox_tensors(part, shape)
    return [{t.key: _own(LAYOUTS[t.layout].split([tensors[k] for k in t.logical], shape, r, dtype)) for t in specs}
            for r in range(shape.tp)]


def part_from_neox(part: str, ranks: list[dict[str, torch.Tensor]], shape: ModelShape) -> dict[str, torch.Tensor]:
    """Every TP rank's NeoX state dict of a part -> its logical tensors (in `logical_part_keys` order)."""
    out = {}
    for t in neox_tensors(part, shape):
        out.update(zip(t.logical, LAYOUTS[t.layout].join([sd[t.key] for sd in ranks], shape)))
    order = logical_layer_keys(shape) if part == "layer" else logical_part_keys(part, shape)
    return {k: out[k] for k in order}


def layer_to_neox(layer: dict[str, torch.Tensor], shape: ModelShape) -> list[dict[str, torch.Tensor]]:
    """Logical layer -> one NeoX state dict per TP rank."""
    return part_to_neox("layer", layer, shape)


def layer_from_neox(ranks: list[dict[str, torch.Tensor]], shape: ModelShape) -> dict[str, torch.Tensor]:
    """Every TP rank's NeoX layer state dict -> logical layer."""
    return part_from_neox("layer", ranks, shape)


def neox_file_shapes(shape: ModelShape) -> dict[int, dict[str, tuple[int, ...]]]:
    """Layer-file index -> per-rank key -> shape, for the whole model (what strict loading wants)."""
    files = {embed_index(): neox_part_shapes("embed", shape)}
    layer = neox_part_shapes("layer", shape)
    for i in range(shape.num_layers):
        files[layer_index(i)] = dict(layer)
    files[final_norm_index(shape.num_layers)] = neox_part_shapes("final_norm", shape)
    files[head_index(shape.num_layers)] = neox_part_shapes("head", shape)
    return files


def part_bytes(part: str, shape: ModelShape, element_size: int) -> int:
    """Bytes of tensor data of one part over all TP ranks."""
    return shape.tp * sum(math.prod(s) for s in neox_part_shapes(part, shape).values()) * element_size


# ---- expansion roles (issue 11): what each logical tensor does, as data ----------------------
# The expansion (neox_progressive/expand/rules.py) widens a tensor by its role, never by its name:
# a role names the rule, and `units` the per-layer map along the tensor's unit dimension (heads and
# kv_heads in whole head_dim-row blocks, ffn neurons one row each). With NEOX_PARTS (NeoX key ->
# logical keys) this maps every NeoX key of both architectures to its role; every logical key of
# one NeoX tensor has the same rule (tests/test_expand_ops.py checks both tables).
class Role(NamedTuple):
    rule: str
    units: str | None = None


LAYER_ROLES: dict[str, Role] = {
    "attn_norm.weight": Role("norm_scale"),
    "attn_norm.bias": Role("norm_bias"),
    "attn.q.weight": Role("reads_hidden", "heads"),
    "attn.k.weight": Role("reads_hidden", "kv_heads"),
    "attn.v.weight": Role("reads_hidden", "kv_heads"),
    "attn.q.bias": Role("unit_bias", "heads"),
    "attn.k.bias": Role("unit_bias", "kv_heads"),
    "attn.v.bias": Role("unit_bias", "kv_heads"),
    "attn.o.weight": Role("writes_residual", "heads"),
    "attn.o.bias": Role("residual_bias"),
    "mlp_norm.weight": Role("norm_scale"),
    "mlp_norm.bias": Role("norm_bias"),
    "mlp.gate.weight": Role("reads_hidden", "ffn"),
    "mlp.up.weight": Role("reads_hidden", "ffn"),
    "mlp.gate.bias": Role("unit_bias", "ffn"),
    "mlp.up.bias": Role("unit_bias", "ffn"),
    "mlp.down.weight": Role("writes_residual", "ffn"),
    "mlp.down.bias": Role("residual_bias"),
}
"""Logical per-layer key -> its role (both architectures; a shape's keys come from `logical_layer_keys`)."""

MODEL_ROLES: dict[str, Role] = {
    "embed.weight": Role("embedding"),
    "pos_embed.weight": Role("position_embedding"),
    "final_norm.weight": Role("norm_scale"),
    "final_norm.bias": Role("norm_bias"),
    "head.weight": Role("head"),
}
"""Logical model-level key -> its role."""

RESIDUAL_WRITERS = frozenset(k for k, r in LAYER_ROLES.items() if r.rule in ("writes_residual", "residual_bias"))
"""What new_layer_init=zero_out sets to 0 on an added layer (it then adds nothing to the residual stream)."""
