"""Export to (and map from) a transformers `LlamaForCausalLM` directory.

NeoX's own converter (tools/ckpts/convert_neox_to_hf.py) splits every fused QKV as if it were
blocked, which is only right for GQA, and copies NeoX's `intermediate_size` (about 3x the
real width) into the HF config. Here the split comes from `arch.py`, which knows both
layouts, and the HF config gets the real FFN width, `num_key_value_heads`, `rms_norm_eps`
and `rope_theta`. Partial rotary (`rotary_pct` < 1) has no HF Llama equivalent and is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from neox_progressive import __version__, arch
from neox_progressive.config import ModelShape
from neox_progressive.errors import UserError
from neox_progressive.io import finite
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.io.writer import AtomicDir

# logical per-layer key -> HF per-layer key (under model.layers.{i}.)
HF_LAYER_KEYS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight",
    "attn.q.bias": "self_attn.q_proj.bias",
    "attn.k.bias": "self_attn.k_proj.bias",
    "attn.v.bias": "self_attn.v_proj.bias",
    "attn.o.bias": "self_attn.o_proj.bias",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
    "mlp.gate.bias": "mlp.gate_proj.bias",
    "mlp.up.bias": "mlp.up_proj.bias",
    "mlp.down.bias": "mlp.down_proj.bias",
}
HF_GLOBAL_KEYS = {"embed.weight": "model.embed_tokens.weight", "final_norm.weight": "model.norm.weight",
                  "head.weight": "lm_head.weight"}
DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def hf_key(logical: str) -> str:
    if logical in HF_GLOBAL_KEYS:
        return HF_GLOBAL_KEYS[logical]
    _, i, rest = logical.split(".", 2)
    return f"model.layers.{i}.{HF_LAYER_KEYS[rest]}"


def logical_from_hf(hf_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LlamaForCausalLM state dict -> logical tensors (for importing HF weights, and tests)."""
    inverse = {v: k for k, v in HF_GLOBAL_KEYS.items()}
    layer_inverse = {v: k for k, v in HF_LAYER_KEYS.items()}
    out = {}
    for key, value in hf_sd.items():
        if key in inverse:
            out[inverse[key]] = value
        elif key.startswith("model.layers."):
            _, _, i, rest = key.split(".", 3)
            if rest in layer_inverse:
                out[f"layers.{i}.{layer_inverse[rest]}"] = value
    return out


def check_exportable(shape: ModelShape) -> None:
    if shape.rotary_pct != 1:
        raise UserError(
            f"rotary_pct={shape.rotary_pct}: transformers' Llama rotates every head dimension, so a "
            "partial-rotary model has no LlamaForCausalLM equivalent; it cannot be exported"
        )


def hf_config(shape: ModelShape, dtype: torch.dtype, bos: int | None = None, eos: int | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape.padded_vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.ffn_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": float(shape.rotary_emb_base),
        "rope_scaling": None,
        "attention_bias": shape.attn_bias,
        "mlp_bias": shape.mlp_bias,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def export_hf(reader: CheckpointReader, out: str | Path, *, dtype: str = "auto", force: bool = False,
              max_shard_bytes: int = 5 * 2**30, bos: int | None = None, eos: int | None = None,
              progress=None, allow_nonfinite: bool = False) -> Path:
    """Write `out` as a LlamaForCausalLM directory (safetensors shards + config.json), layer by layer.

    NaN/Inf weights are refused (one line naming the file and key) unless `allow_nonfinite`.
    """
    from safetensors.torch import save_file

    shape = reader.shape
    check_exportable(shape)
    if shape.mlp_bias:
        try:
            import transformers
            from packaging.version import Version
            if Version(transformers.__version__) < Version("4.41"):
                raise UserError(
                    f"use_bias_in_mlp needs transformers >= 4.41 (found {transformers.__version__}) for LlamaConfig.mlp_bias"
                )
        except ImportError:
            pass
    target = DTYPES[dtype]
    stored = reader.file_state(arch.embed_index())[0][arch.EMBED_KEY].dtype  # memory-mapped: no data read
    reader = finite.guard(reader, allow_nonfinite, stored if target is None else None)
    atomic = AtomicDir(out, force, need_bytes=shape.param_count() * (target or stored).itemsize)
    with atomic as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        sizes = [0]
        index: dict[str, str] = {}
        files: list[str] = []
        out_dtype = None

        def add(key: str, t: torch.Tensor):
            nonlocal out_dtype
            t = t.to(target) if target is not None else t
            out_dtype = t.dtype
            n = t.numel() * t.element_size()
            if sizes[-1] and sizes[-1] + n > max_shard_bytes:
                flush()
            shards[-1][key] = t.contiguous()
            sizes[-1] += n

        def flush():
            name = f"model-{len(files) + 1:05d}.safetensors"
            atomic.current = tmp / name
            save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
            files.append(name)
            index.update({k: name for k in shards[-1]})
            shards.append({})
            sizes.append(0)

        add(hf_key("embed.weight"), reader.embed())
        for i, layer in reader.iter_layers():
            for k, v in layer.items():
                add(f"model.layers.{i}.{HF_LAYER_KEYS[k]}", v)
            if progress:
                progress(i)
        add(hf_key("final_norm.weight"), reader.final_norm())
        add(hf_key("head.weight"), reader.head())
        flush()
        if len(files) == 1:
            (tmp / files[0]).rename(tmp / "model.safetensors")
        else:
            total = sum(sizes)
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2))
        cfg = hf_config(shape, out_dtype, bos, eos)
        cfg["neox_progressive_version"] = __version__
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}, indent=2) + "\n")
    return Path(out)
