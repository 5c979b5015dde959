"""The GPT-NeoX weight layout of a Llama-style model, as data plus fuse/shard functions.

Logical view (what the rest of the plugin works on): unsharded, unfused tensors with the
names of the reference model (`model.py`), e.g. ``embed.weight`` [V, h],
``layers.3.attn.q.weight`` [nh*d, h], ``layers.3.mlp.gate.weight`` [F, h], ``head.weight``.

NeoX view (NEOX_FACTS.md section 1-4, megatron/model/{gpt2_model,transformer}.py):

    spec index      file                      keys (per TP rank)
    0               layer_00                  word_embeddings.weight      [V/TP, h]
    i + 2           layer_{i+2}               input_layernorm.scale       [h]      (replicated)
                                              attention.query_key_value.weight  MHA: [3*np*d, h]
                                                  rows per local head: q_j, k_j, v_j (interleaved)
                                                  GQA: [(np + 2*kvp)*d, h] = [Q_r | K_r | V_r]
                                              attention.dense.weight      [h, np*d] (row parallel)
                                              post_attention_layernorm.scale [h]
                                              mlp.linear1.weight          [2F/TP, h] = [up_r; gate_r]
                                              mlp.linear2.weight          [h, F/TP] (row parallel)
    L + 3           layer_{L+3}               norm.scale                  [h]
    L + 4           layer_{L+4}               final_linear.weight         [V/TP, h]

Row-parallel biases (dense, linear2) are full size on every rank; column-parallel biases are
split like their weights. `attention.rotary_emb.inv_freq` exists only when
`rotary_save_freqs_buffer` is set (loading is strict, so it must match the config).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from neox_progressive.config import ModelShape

# logical per-layer key -> NeoX per-layer key, for the tensors that map one to one
# (norms are replicated; the rest need fusing or sharding and are handled below).
NORM_KEYS = {
    "attn_norm.weight": "input_layernorm.scale",
    "mlp_norm.weight": "post_attention_layernorm.scale",
}
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
FINAL_NORM_KEY = "norm.scale"
HEAD_KEY = "final_linear.weight"


def embed_index() -> int:
    return 0


def layer_index(i: int) -> int:
    """NeoX pipeline spec index (and layer-file number) of transformer layer i."""
    return i + 2


def final_norm_index(num_layers: int) -> int:
    return num_layers + 3


def head_index(num_layers: int) -> int:
    return num_layers + 4


def layer_file_name(index: int, tp_rank: int) -> str:
    """`layer_XX-model_TT-model_states.pt` (DeepSpeed pipe/module.py; 3 digits from 100)."""
    return f"layer_{index:02d}-model_{tp_rank:02d}-model_states.pt"


def mp_rank_file_name(rank: int) -> str:
    return f"mp_rank_{rank:02d}_model_states.pt"


def logical_layer_keys(shape: ModelShape) -> list[str]:
    """The logical keys of one transformer layer, in a fixed order."""
    keys = ["attn_norm.weight", "attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight"]
    if shape.attn_bias:
        keys += ["attn.q.bias", "attn.k.bias", "attn.v.bias", "attn.o.bias"]
    keys += ["mlp_norm.weight", "mlp.gate.weight", "mlp.up.weight", "mlp.down.weight"]
    if shape.mlp_bias:
        keys += ["mlp.gate.bias", "mlp.up.bias", "mlp.down.bias"]
    return keys


def logical_layer_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    h, f, d = shape.hidden_size, shape.ffn_size, shape.head_dim
    q, kv = shape.num_heads * d, shape.num_kv_heads * d
    full = {
        "attn_norm.weight": (h,), "attn.q.weight": (q, h), "attn.k.weight": (kv, h),
        "attn.v.weight": (kv, h), "attn.o.weight": (h, q), "attn.q.bias": (q,),
        "attn.k.bias": (kv,), "attn.v.bias": (kv,), "attn.o.bias": (h,),
        "mlp_norm.weight": (h,), "mlp.gate.weight": (f, h), "mlp.up.weight": (f, h),
        "mlp.down.weight": (h, f), "mlp.gate.bias": (f,), "mlp.up.bias": (f,), "mlp.down.bias": (h,),
    }
    return {k: full[k] for k in logical_layer_keys(shape)}


def neox_layer_shapes(shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """Per-TP-rank NeoX keys and shapes of one transformer layer file (strict-load key set)."""
    h, f, d, tp = shape.hidden_size, shape.ffn_size, shape.head_dim, shape.tp
    np_, kvp = shape.num_heads // tp, shape.num_kv_heads // tp
    qkv_rows = (np_ + 2 * kvp) * d
    out = {
        "input_layernorm.scale": (h,),
        QKV_WEIGHT: (qkv_rows, h),
        DENSE_WEIGHT: (h, np_ * d),
        "post_attention_layernorm.scale": (h,),
        LINEAR1_WEIGHT: (2 * f // tp, h),
        LINEAR2_WEIGHT: (h, f // tp),
    }
    if shape.attn_bias:
        out[QKV_BIAS] = (qkv_rows,)
        out[DENSE_BIAS] = (h,)
    if shape.mlp_bias:
        out[LINEAR1_BIAS] = (2 * f // tp,)
        out[LINEAR2_BIAS] = (h,)
    if shape.rotary_save_freqs_buffer:
        out[INV_FREQ] = (shape.rotary_dims // 2,)
    return out


def rotary_inv_freq(shape: ModelShape) -> torch.Tensor:
    dim = shape.rotary_dims
    return 1.0 / (shape.rotary_emb_base ** (torch.arange(0, dim, 2).float() / dim))


# ---- QKV --------------------------------------------------------------------------------------
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


# ---- linear1 = [up_r; gate_r] per rank ---------------------------------------------------------
def fuse_linear1(up: torch.Tensor, gate: torch.Tensor, shape: ModelShape, rank: int) -> torch.Tensor:
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


# ---- whole layer files ------------------------------------------------------------------------
def layer_to_neox(layer: dict[str, torch.Tensor], shape: ModelShape) -> list[dict[str, torch.Tensor]]:
    """Logical layer -> one NeoX state dict per TP rank (contiguous tensors, key order as NeoX)."""
    out = []
    for r in range(shape.tp):
        sd = {"input_layernorm.scale": layer["attn_norm.weight"]}
        sd[QKV_WEIGHT] = fuse_qkv(layer["attn.q.weight"], layer["attn.k.weight"], layer["attn.v.weight"], shape, r)
        if shape.attn_bias:
            sd[QKV_BIAS] = fuse_qkv(layer["attn.q.bias"], layer["attn.k.bias"], layer["attn.v.bias"], shape, r)
        if shape.rotary_save_freqs_buffer:
            sd[INV_FREQ] = rotary_inv_freq(shape).to(layer["attn.q.weight"].dtype)
        sd[DENSE_WEIGHT] = _cols(layer["attn.o.weight"], shape.tp, r)
        if shape.attn_bias:
            sd[DENSE_BIAS] = layer["attn.o.bias"]
        sd["post_attention_layernorm.scale"] = layer["mlp_norm.weight"]
        sd[LINEAR1_WEIGHT] = fuse_linear1(layer["mlp.up.weight"], layer["mlp.gate.weight"], shape, r)
        if shape.mlp_bias:
            sd[LINEAR1_BIAS] = fuse_linear1(layer["mlp.up.bias"], layer["mlp.gate.bias"], shape, r)
        sd[LINEAR2_WEIGHT] = _cols(layer["mlp.down.weight"], shape.tp, r)
        if shape.mlp_bias:
            sd[LINEAR2_BIAS] = layer["mlp.down.bias"]
        out.append({k: _own(v) for k, v in sd.items()})
    return out


def layer_from_neox(ranks: list[dict[str, torch.Tensor]], shape: ModelShape) -> dict[str, torch.Tensor]:
    """Every TP rank's NeoX layer state dict -> logical layer."""
    first = ranks[0]
    out = {"attn_norm.weight": first["input_layernorm.scale"]}
    q, k, v = unfuse_qkv([sd[QKV_WEIGHT] for sd in ranks], shape)
    out.update({"attn.q.weight": q, "attn.k.weight": k, "attn.v.weight": v})
    out["attn.o.weight"] = torch.cat([sd[DENSE_WEIGHT] for sd in ranks], dim=1)
    if shape.attn_bias:
        qb, kb, vb = unfuse_qkv([sd[QKV_BIAS] for sd in ranks], shape)
        out.update({"attn.q.bias": qb, "attn.k.bias": kb, "attn.v.bias": vb, "attn.o.bias": first[DENSE_BIAS]})
    out["mlp_norm.weight"] = first["post_attention_layernorm.scale"]
    up, gate = unfuse_linear1([sd[LINEAR1_WEIGHT] for sd in ranks], shape)
    out.update({"mlp.gate.weight": gate, "mlp.up.weight": up})
    out["mlp.down.weight"] = torch.cat([sd[LINEAR2_WEIGHT] for sd in ranks], dim=1)
    if shape.mlp_bias:
        ub, gb = unfuse_linear1([sd[LINEAR1_BIAS] for sd in ranks], shape)
        out.update({"mlp.gate.bias": gb, "mlp.up.bias": ub, "mlp.down.bias": first[LINEAR2_BIAS]})
    return {key: out[key] for key in logical_layer_keys(shape)}


def embed_to_neox(weight: torch.Tensor, shape: ModelShape) -> list[dict[str, torch.Tensor]]:
    return [{EMBED_KEY: _own(_rows(weight, shape.tp, r))} for r in range(shape.tp)]


def head_to_neox(weight: torch.Tensor, shape: ModelShape) -> list[dict[str, torch.Tensor]]:
    return [{HEAD_KEY: _own(_rows(weight, shape.tp, r))} for r in range(shape.tp)]


def final_norm_to_neox(weight: torch.Tensor, shape: ModelShape) -> list[dict[str, torch.Tensor]]:
    return [{FINAL_NORM_KEY: _own(weight)} for _ in range(shape.tp)]


def neox_file_shapes(shape: ModelShape) -> dict[int, dict[str, tuple[int, ...]]]:
    """Layer-file index -> per-rank key -> shape, for the whole model (what strict loading wants)."""
    v = shape.padded_vocab_size
    files: dict[int, dict[str, tuple[int, ...]]] = {}
    files[embed_index()] = {EMBED_KEY: (v // shape.tp if v else -1, shape.hidden_size)}
    for i in range(shape.num_layers):
        files[layer_index(i)] = neox_layer_shapes(shape)
    files[final_norm_index(shape.num_layers)] = {FINAL_NORM_KEY: (shape.hidden_size,)}
    files[head_index(shape.num_layers)] = {HEAD_KEY: (v // shape.tp if v else -1, shape.hidden_size)}
    return files


# ---- expansion roles (issue 11): what each logical tensor does, as data ----------------------
# The expansion (neox_progressive/expand/rules.py) widens a tensor by its role, never by its name:
# a role names the rule, and `units` the per-layer map along the tensor's unit dimension (heads and
# kv_heads in whole head_dim-row blocks, ffn neurons one row each). `neox` says where NeoX keeps the
# tensor (per layer file; "|" separates the Llama-shape and classic names where they differ).
# tests/test_expand_roles.py checks the table against the conversion functions above.
class Role(NamedTuple):
    rule: str
    units: str | None = None
    neox: str = ""


LAYER_ROLES: dict[str, Role] = {
    "attn_norm.weight": Role("norm_scale", None, "input_layernorm.scale | input_layernorm.weight"),
    "attn_norm.bias": Role("norm_bias", None, "input_layernorm.bias"),
    "attn.q.weight": Role("reads_hidden", "heads", QKV_WEIGHT),
    "attn.k.weight": Role("reads_hidden", "kv_heads", QKV_WEIGHT),
    "attn.v.weight": Role("reads_hidden", "kv_heads", QKV_WEIGHT),
    "attn.q.bias": Role("unit_bias", "heads", QKV_BIAS),
    "attn.k.bias": Role("unit_bias", "kv_heads", QKV_BIAS),
    "attn.v.bias": Role("unit_bias", "kv_heads", QKV_BIAS),
    "attn.o.weight": Role("writes_residual", "heads", DENSE_WEIGHT),
    "attn.o.bias": Role("residual_bias", None, DENSE_BIAS),
    "mlp_norm.weight": Role("norm_scale", None, "post_attention_layernorm.scale | post_attention_layernorm.weight"),
    "mlp_norm.bias": Role("norm_bias", None, "post_attention_layernorm.bias"),
    "mlp.gate.weight": Role("reads_hidden", "ffn", LINEAR1_WEIGHT),
    "mlp.up.weight": Role("reads_hidden", "ffn", LINEAR1_WEIGHT),
    "mlp.gate.bias": Role("unit_bias", "ffn", LINEAR1_BIAS),
    "mlp.up.bias": Role("unit_bias", "ffn", LINEAR1_BIAS),
    "mlp.down.weight": Role("writes_residual", "ffn", LINEAR2_WEIGHT),
    "mlp.down.bias": Role("residual_bias", None, LINEAR2_BIAS),
}
"""Logical per-layer key -> its role (both architectures; a shape's keys come from `logical_layer_keys`)."""

MODEL_ROLES: dict[str, Role] = {
    "embed.weight": Role("embedding", None, EMBED_KEY),
    "pos_embed.weight": Role("position_embedding", None, "position_embeddings.weight"),
    "final_norm.weight": Role("norm_scale", None, "norm.scale | norm.weight"),
    "final_norm.bias": Role("norm_bias", None, "norm.bias"),
    "head.weight": Role("head", None, HEAD_KEY),
}
"""Logical model-level key -> its role."""

RESIDUAL_WRITERS = frozenset(k for k, r in LAYER_ROLES.items() if r.rule in ("writes_residual", "residual_bias"))
"""What new_layer_init=zero_out sets to 0 on an added layer (it then adds nothing to the residual stream)."""
