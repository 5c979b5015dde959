"""Export to (and map from) a transformers directory: LlamaForCausalLM or GPTNeoXForCausalLM.

The Llama shape becomes `LlamaForCausalLM`; NeoX's classic transformer (LayerNorm, GeLU, rotary,
MHA: Pythia) becomes `GPTNeoXForCausalLM`. The key maps below are data: HF key -> the logical
keys it holds (more than one only for GPTNeoX's fused `query_key_value`, whose rows are per head
[q_j; k_j; v_j], the layout NeoX itself uses for MHA at TP 1).

NeoX's own converter (tools/ckpts/convert_neox_to_hf.py) splits every Llama QKV as if it were
blocked, which is only right for GQA, and copies NeoX's `intermediate_size` (about 3x the real
SwiGLU width) into the HF config. Here the split comes from `arch.py`, which knows both layouts.
The GPTNeoX config says what NeoX computed: `use_parallel_residual` (gpt_j_residual),
`rotary_pct`, `layer_norm_eps` and `hidden_act` = `gelu_pytorch_tanh` when NeoX used the tanh
GeLU (`bias_gelu_fusion: true`), `gelu` (erf) otherwise. The head is saved as `embed_out.weight`,
the name transformers 4.x loads and 5.x renames to `lm_head` on load; `rotary_pct` and
`rotary_emb_base` are 4.x keys that 5.x turns into `rope_parameters`.
Models with no HF equivalent (partial rotary in Llama, learned positions, GQA in GPTNeoX, mixes
such as LayerNorm + SwiGLU) are refused with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from neox_progressive import __version__, arch
from neox_progressive.config import ModelShape
from neox_progressive.errors import UserError
from neox_progressive.io import finite
from neox_progressive.io.reader import CheckpointReader, copy_model

QKV = ("attn.q.{p}", "attn.k.{p}", "attn.v.{p}")
LLAMA_LAYER = {  # HF key under model.layers.{i}. -> logical keys
    "input_layernorm.weight": ("attn_norm.weight",),
    "self_attn.q_proj.weight": ("attn.q.weight",),
    "self_attn.k_proj.weight": ("attn.k.weight",),
    "self_attn.v_proj.weight": ("attn.v.weight",),
    "self_attn.o_proj.weight": ("attn.o.weight",),
    "self_attn.q_proj.bias": ("attn.q.bias",),
    "self_attn.k_proj.bias": ("attn.k.bias",),
    "self_attn.v_proj.bias": ("attn.v.bias",),
    "self_attn.o_proj.bias": ("attn.o.bias",),
    "post_attention_layernorm.weight": ("mlp_norm.weight",),
    "mlp.gate_proj.weight": ("mlp.gate.weight",),
    "mlp.up_proj.weight": ("mlp.up.weight",),
    "mlp.down_proj.weight": ("mlp.down.weight",),
    "mlp.gate_proj.bias": ("mlp.gate.bias",),
    "mlp.up_proj.bias": ("mlp.up.bias",),
    "mlp.down_proj.bias": ("mlp.down.bias",),
}
LLAMA_GLOBAL = {"model.embed_tokens.weight": ("embed.weight",), "model.norm.weight": ("final_norm.weight",),
                "lm_head.weight": ("head.weight",)}
NEOX_LAYER = {  # HF key under gpt_neox.layers.{i}. -> logical keys
    "input_layernorm.weight": ("attn_norm.weight",),
    "input_layernorm.bias": ("attn_norm.bias",),
    "post_attention_layernorm.weight": ("mlp_norm.weight",),
    "post_attention_layernorm.bias": ("mlp_norm.bias",),
    "attention.query_key_value.weight": tuple(k.format(p="weight") for k in QKV),
    "attention.query_key_value.bias": tuple(k.format(p="bias") for k in QKV),
    "attention.dense.weight": ("attn.o.weight",),
    "attention.dense.bias": ("attn.o.bias",),
    "mlp.dense_h_to_4h.weight": ("mlp.up.weight",),
    "mlp.dense_h_to_4h.bias": ("mlp.up.bias",),
    "mlp.dense_4h_to_h.weight": ("mlp.down.weight",),
    "mlp.dense_4h_to_h.bias": ("mlp.down.bias",),
}
NEOX_GLOBAL = {"gpt_neox.embed_in.weight": ("embed.weight",), "gpt_neox.final_layer_norm.weight": ("final_norm.weight",),
               "gpt_neox.final_layer_norm.bias": ("final_norm.bias",), "embed_out.weight": ("head.weight",)}
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class HfArch:
    """One transformers architecture: class name, key maps, and HF tensors that exist without a NeoX twin."""

    name: str
    layer_prefix: str
    layer: dict[str, tuple[str, ...]]
    globals: dict[str, tuple[str, ...]]
    zero_filled: tuple[str, ...] = ()
    """HF keys always present in the HF model; written as zeros when the NeoX model has no such tensor."""


LLAMA = HfArch("LlamaForCausalLM", "model.layers.{i}.", LLAMA_LAYER, LLAMA_GLOBAL)
GPT_NEOX = HfArch("GPTNeoXForCausalLM", "gpt_neox.layers.{i}.", NEOX_LAYER, NEOX_GLOBAL,
                  zero_filled=("mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.bias"))


def hf_arch(shape: ModelShape) -> HfArch:
    """The transformers architecture that computes exactly what NeoX computes for `shape`, or a UserError."""
    if shape.architecture == "llama":
        if shape.rotary_pct != 1:
            raise UserError(f"rotary_pct={shape.rotary_pct}: transformers' Llama rotates every head dimension, so a "
                            "partial-rotary Llama-shape model has no LlamaForCausalLM equivalent; it cannot be exported")
        return LLAMA
    if shape.architecture == "neox":
        if shape.pos_emb != "rotary":
            raise UserError("pos_emb: learned: transformers' GPTNeoX has no learned position embeddings, so this model "
                            "has no GPTNeoXForCausalLM equivalent; it cannot be exported")
        if shape.gqa:
            raise UserError(f"num_kv_heads {shape.num_kv_heads} < num_attention_heads {shape.num_heads}: transformers' "
                            "GPTNeoX has no grouped-query attention; this model cannot be exported")
        return GPT_NEOX
    raise UserError(f"this model mixes parts ({shape.architecture}) that no transformers class combines; export-hf "
                    "writes the Llama shape (rmsnorm, swiglu) or NeoX's classic transformer (layernorm, gelu)")


def check_exportable(shape: ModelShape) -> None:
    hf_arch(shape)


def _shape1(shape: ModelShape | None) -> ModelShape:
    """The same model at TP 1 (GPTNeoX's fused QKV is NeoX's MHA layout of a single rank)."""
    if shape is None:
        raise ValueError("a GPTNeoX state dict needs the model's shape (head count) to split query_key_value")
    return shape.replace(tp=1)


def hf_tensors(logical: dict[str, torch.Tensor], table: dict[str, tuple[str, ...]], shape: ModelShape,
               hf: HfArch) -> dict[str, torch.Tensor]:
    """Logical tensors -> HF tensors of one table (a layer's or the globals); fused QKV built per head."""
    out = {}
    for key, sources in table.items():
        if all(s in logical for s in sources):
            parts = [logical[s] for s in sources]
            out[key] = arch.fuse_qkv(*parts, _shape1(shape), 0) if len(parts) == 3 else parts[0]
        elif key in hf.zero_filled:
            like = {"mlp.dense_h_to_4h.bias": shape.ffn_size, "mlp.dense_4h_to_h.bias": shape.hidden_size}[key]
            out[key] = torch.zeros(like, dtype=next(iter(logical.values())).dtype)
    return out


def hf_config(shape: ModelShape, dtype: torch.dtype, bos: int | None = None, eos: int | None = None) -> dict:
    """config.json for `shape` (the class from `hf_arch`)."""
    common = {
        "vocab_size": shape.padded_vocab_size, "hidden_size": shape.hidden_size,
        "intermediate_size": shape.ffn_size, "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads, "max_position_embeddings": shape.max_position_embeddings,
        "attention_dropout": 0.0, "tie_word_embeddings": False, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": bos, "eos_token_id": eos, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if hf_arch(shape) is GPT_NEOX:
        return {"architectures": [GPT_NEOX.name], "model_type": "gpt_neox", **common,
                "hidden_act": "gelu_pytorch_tanh" if shape.gelu_approx == "tanh" else "gelu",
                "layer_norm_eps": shape.layernorm_eps, "use_parallel_residual": shape.parallel_residual,
                "rotary_pct": shape.rotary_pct, "rotary_emb_base": shape.rotary_emb_base,
                "attention_bias": shape.attn_bias, "hidden_dropout": 0.0, "classifier_dropout": 0.0}
    return {"architectures": [LLAMA.name], "model_type": "llama", **common,
            "num_key_value_heads": shape.num_kv_heads, "head_dim": shape.head_dim, "hidden_act": "silu",
            "rms_norm_eps": shape.rms_norm_eps, "rope_theta": float(shape.rotary_emb_base), "rope_scaling": None,
            "attention_bias": shape.attn_bias, "mlp_bias": shape.mlp_bias}


def logical_from_hf(hf_sd: dict[str, torch.Tensor], shape: ModelShape | None = None) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM or GPTNeoXForCausalLM state dict -> logical tensors (importing HF weights, tests).

    GPTNeoX needs `shape` (head count for the fused QKV; biases the shape lacks are dropped)."""
    hf = GPT_NEOX if any(k.startswith("gpt_neox.") for k in hf_sd) else LLAMA
    rename = {"lm_head.weight": "embed_out.weight"} if hf is GPT_NEOX else {}
    prefix = hf.layer_prefix.split("{")[0]
    out: dict[str, torch.Tensor] = {}
    for key, value in hf_sd.items():
        key = rename.get(key, key)
        if key in hf.globals:
            sources, table_key = hf.globals[key], key
        elif key.startswith(prefix):
            i, table_key = key[len(prefix):].split(".", 1)
            if table_key not in hf.layer:
                continue
            sources = tuple(f"layers.{i}.{s}" for s in hf.layer[table_key])
        else:
            continue
        parts = arch.unfuse_qkv([value], _shape1(shape)) if len(sources) == 3 else (value,)
        out.update(zip(sources, parts))
    if shape is not None:
        keep = set(arch.logical_keys(shape))
        out = {k: v for k, v in out.items() if k in keep}
    return out


def _check_transformers(shape: ModelShape) -> None:
    if shape.mlp_bias and hf_arch(shape) is LLAMA:
        try:
            import transformers
            from packaging.version import Version
            if Version(transformers.__version__) < Version("4.41"):
                raise UserError(
                    f"use_bias_in_mlp needs transformers >= 4.41 (found {transformers.__version__}) for LlamaConfig.mlp_bias"
                )
        except ImportError:
            pass


def export_hf(reader: CheckpointReader, out: str | Path, *, dtype: str = "auto", force: bool = False,
              max_shard_bytes: int = 5 * 2**30, bos: int | None = None, eos: int | None = None,
              progress=None, tokenizer=None, allow_nonfinite: bool = False) -> Path:
    """Write `out` as a transformers directory (safetensors shards + config.json), layer by layer (io/hf_writer.py).

    NaN/Inf weights are refused (one line naming the file and key) unless `allow_nonfinite`.
    """
    from neox_progressive.io.hf_writer import HFWriter

    shape = reader.shape
    _check_transformers(shape)
    stored = reader.file_state(arch.embed_index())[0][arch.EMBED_KEY].dtype  # memory-mapped: no data read
    reader = finite.guard(reader, allow_nonfinite, stored if DTYPES[dtype] is None else None)
    out_dtype = DTYPES[dtype] or stored
    config = hf_config(shape, out_dtype, bos, eos)
    config["neox_progressive_version"] = __version__
    with HFWriter(out, shape, out_dtype, config=config, force=force, max_shard_bytes=max_shard_bytes,
                  tokenizer=tokenizer) as w:
        copy_model(reader, w, progress)
    return Path(out)
