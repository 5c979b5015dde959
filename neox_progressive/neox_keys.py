"""NeoX's config keys that decide a model's architecture: NeoX's defaults, the values this plugin
represents, and the one-line refusal of everything else (read by `config.ModelShape.from_neox`).

Two architectures are represented (NEOX_FACTS.md sections 2 and 11): the Llama shape (`norm:
rmsnorm`, `activation: swiglu`, rotary) and NeoX's classic transformer (`norm: layernorm`,
`activation: gelu`, `gpt_j_residual`, partial rotary or learned positions). Keys that make NeoX build
something else (tied embeddings, MoE, muP, QK-norm, TransformerEngine layers, ...) are refused
naming the key, its value and what it would build.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from neox_progressive.errors import UserError

# NeoX defaults (megatron/neox_arguments/neox_args.py) for the keys that decide a shape.
NEOX_DEFAULTS: dict[str, Any] = {
    "pipe_parallel_size": 0,
    "model_parallel_size": 1,
    "intermediate_size": None,
    "expansion_factor": None,
    "mlp_multiple_of": 1,
    "num_kv_heads": None,
    "norm": "layernorm",
    "rms_norm_epsilon": 1.0e-8,
    "layernorm_epsilon": 1.0e-5,
    "pos_emb": "learned",
    "no_weight_tying": False,
    "make_vocab_size_divisible_by": 128,
    "activation": "gelu",
    "bias_gelu_fusion": False,
    "onnx_safe": False,
    "rotary_pct": 1.0,
    "rotary_emb_base": 10000,
    "rotary_save_freqs_buffer": False,
    "gpt_j_residual": False,
    "gpt_j_tied": False,
    "use_bias_in_attn_linear": True,
    "use_bias_in_mlp": True,
    "use_qk_layernorm": False,
    "use_mup": False,
    "soft_prompt_tuning": None,
    "output_layer_parallelism": "column",
    "moe_num_experts": 1,
    "opt_pos_emb_offset": 0,
    "mup_rp_embedding_mult": 1.0,
    "sliding_window_width": None,
    "attention_config": None,
    "te_mha": False,
    "te_fp8_mha": False,
    "te_layernorm_mlp": False,
    "te_columnparallel": False,
    "te_rowparallel": False,
    "tokenizer_type": "GPT2BPETokenizer",
    "vocab_file": None,
    "precision": None,
}

# Architecture keys with the values this plugin represents (see `ModelShape`).
SUPPORTED_CHOICES = {
    "norm": ("rmsnorm", "layernorm"),
    "activation": ("swiglu", "gelu"),
    "pos_emb": ("rotary", "learned"),
}
# Keys that select a model NeoX can build but this plugin cannot represent, with the value
# this plugin needs (NEOX_FACTS.md sections 2 and 11).
REQUIRED_VALUES = {
    "no_weight_tying": True,
    "gpt_j_tied": False,
    "use_qk_layernorm": False,
    "use_mup": False,
    "soft_prompt_tuning": None,
    "moe_num_experts": 1,
    "opt_pos_emb_offset": 0,
    "mup_rp_embedding_mult": 1.0,
    "sliding_window_width": None,
    "te_mha": False,
    "te_fp8_mha": False,
    "te_layernorm_mlp": False,
    "te_columnparallel": False,
    "te_rowparallel": False,
}
# What each of those keys would build (said in the refusal).
REFUSAL_REASONS = {
    "no_weight_tying": "tied input and output embeddings",
    "gpt_j_tied": "one LayerNorm shared by attention and MLP",
    "use_qk_layernorm": "LayerNorm on queries and keys",
    "use_mup": "muP scaling of activations",
    "soft_prompt_tuning": "a soft-prompt layer",
    "moe_num_experts": "mixture-of-experts MLPs",
    "opt_pos_emb_offset": "OPT's offset learned positions",
    "mup_rp_embedding_mult": "scaled learned positions",
    "sliding_window_width": "sliding-window attention",
    "te_mha": "TransformerEngine layers, whose weights are laid out differently",
    "te_fp8_mha": "TransformerEngine layers, whose weights are laid out differently",
    "te_layernorm_mlp": "TransformerEngine layers, whose weights are laid out differently",
    "te_columnparallel": "TransformerEngine layers, whose weights are laid out differently",
    "te_rowparallel": "TransformerEngine layers, whose weights are laid out differently",
}
# attention_config layer types that are plain causal self-attention (flash is the same math).
ATTENTION_TYPES = ("global", "flash")
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("swiglu", "gelu")
GELU_APPROX = ("erf", "tanh")
POS_EMBS = ("rotary", "learned")


def architecture_fields(get: Callable[[str], Any]) -> dict[str, Any]:
    """The architecture fields of `ModelShape` from NeoX keys (`get(key)` gives the value or NeoX's
    default); one-line UserError for anything this plugin cannot represent."""
    for key, allowed in SUPPORTED_CHOICES.items():
        have = get(key)
        if not isinstance(have, str) or have.lower() not in allowed:
            raise UserError(f"config key {key}: {have!r} is not supported; neox-progressive handles {key}: "
                            f"{' or '.join(allowed)} (the Llama shape and NeoX's classic transformer)")
    for key, want in REQUIRED_VALUES.items():
        have = get(key)
        if have != want and not (isinstance(want, float) and isinstance(have, (int, float)) and float(have) == want):
            raise UserError(f"config key {key}: {have!r} is not supported ({REFUSAL_REASONS[key]}); neox-progressive "
                            f"represents the Llama shape and NeoX's classic transformer, which need {key}: {want!r}")
    for entry in get("attention_config") or []:
        types = entry[0] if isinstance(entry, (list, tuple)) and entry else entry
        for kind in types if isinstance(types, (list, tuple)) else [types]:
            if str(kind).lower() not in ATTENTION_TYPES:
                raise UserError(f"config key attention_config: layer type {kind!r} is not supported; neox-progressive "
                                f"handles {' or '.join(ATTENTION_TYPES)} attention, e.g. attention_config: [[[\"global\"], L]]")
    norm, activation = get("norm").lower(), get("activation").lower()
    if activation == "gelu" and get("onnx_safe") and get("bias_gelu_fusion"):
        raise UserError("config keys onnx_safe: true and bias_gelu_fusion: true: NeoX refuses the pair "
                        "(activations.py); set one of them to false")
    return {
        "norm": norm,
        "layernorm_eps": float(get("layernorm_epsilon")) if norm == "layernorm" else NEOX_DEFAULTS["layernorm_epsilon"],
        "rms_norm_eps": float(get("rms_norm_epsilon")) if norm == "rmsnorm" else NEOX_DEFAULTS["rms_norm_epsilon"],
        "activation": activation,
        "gelu_approx": "tanh" if activation == "gelu" and get("bias_gelu_fusion") else "erf",
        "parallel_residual": bool(get("gpt_j_residual")),
        "pos_emb": get("pos_emb").lower(),
    }
