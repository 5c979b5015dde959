"""Hugging Face `config.json` -> the NeoX `ModelShape` that computes the same function, or a one-line refusal.

Architectures: LlamaForCausalLM, MistralForCausalLM (no sliding window in use), Qwen2ForCausalLM (q/k/v
biases), GPTNeoXForCausalLM. Both config formats: transformers 4.x (`rope_theta`, `rope_scaling`,
`rotary_pct`, `rotary_emb_base`) and 5.x (`rope_parameters`). Every refusal names the config.json key,
its value and the fix (rope scaling, sliding window, MoE, head_dim, activation, architecture).
`check_same_model` compares a NeoX config's shape with it; `divisible_by_for` picks the vocab padding
that makes NeoX pad the tokenizer to exactly the HF embedding rows. Used by `io/hf_reader.py`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from neox_progressive.config import ModelShape
from neox_progressive.errors import UserError
from neox_progressive.hf import GPT_NEOX

LLAMA_FAMILY = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED = (*LLAMA_FAMILY, GPT_NEOX.name)
TANH_GELU = ("gelu_pytorch_tanh", "gelu_new", "gelu_fast")
MOE_KEYS = ("num_local_experts", "num_experts", "moe_intermediate_size", "num_experts_per_tok")
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "gpt_neox": GPT_NEOX.name}
"""`model_type` -> architecture, for a config.json without `architectures` (a config saved on its own)."""
HF_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """`config.json` of an HF directory as a dict (one-line errors for a missing or broken file)."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise UserError(f"{hf_dir} is not a directory; pass a Hugging Face model directory (with config.json)")
    if not path.is_file():
        raise UserError(f"{path} does not exist; pass a Hugging Face model directory (save_pretrained writes it)")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); restore the file from the model's source") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def _refuse(where: Path, key: str, value: Any, why: str, fix: str) -> UserError:
    return UserError(f"{where}: {key} = {json.dumps(value)}: {why}; {fix}")


def _architecture(cfg: dict, where: Path) -> str:
    names = cfg.get("architectures") or ([MODEL_TYPES[cfg["model_type"]]] if cfg.get("model_type") in MODEL_TYPES else [])
    if len(names) != 1 or names[0] not in SUPPORTED:
        kind = "mixture of experts" if any(cfg.get(k) for k in MOE_KEYS) else "not a supported architecture"
        raise _refuse(where, "architectures", names, f"{kind} (NeoX can represent {', '.join(SUPPORTED)})",
                      "import a model of one of those architectures")
    if any(cfg.get(k) for k in MOE_KEYS):
        key = next(k for k in MOE_KEYS if cfg.get(k))
        raise _refuse(where, key, cfg[key], "mixture of experts: NeoX's transformer has one dense MLP per layer",
                      "import a dense model")
    return names[0]


def _rope(cfg: dict, where: Path) -> tuple[float, float]:
    """(rope base, partial rotary factor) from a 4.x config (rope_theta, rope_scaling, rotary_pct,
    rotary_emb_base) or a 5.x one (rope_parameters)."""
    params = cfg.get("rope_parameters")
    key = "rope_parameters" if params is not None else "rope_scaling"
    scaling = params if params is not None else cfg.get("rope_scaling")
    if scaling is not None:
        if not isinstance(scaling, dict):
            raise _refuse(where, key, scaling, "expected an object or null", "restore config.json")
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in (None, "default"):
            raise _refuse(where, f"{key}.rope_type", kind, "NeoX's rotary embedding has no scaling (only the "
                          "plain rotate-half RoPE)", "import a model without rope scaling")
    scaling = scaling or {}
    base = scaling.get("rope_theta", cfg.get("rope_theta", cfg.get("rotary_emb_base", 10000)))
    pct = scaling.get("partial_rotary_factor", cfg.get("partial_rotary_factor", cfg.get("rotary_pct", 1.0)))
    if float(base) != int(float(base)):
        raise _refuse(where, "rope_theta", base, "NeoX's rotary_emb_base is an integer", "use an integer base")
    return int(float(base)), float(pct)


def _sliding_window(cfg: dict, name: str, where: Path) -> None:
    layer_types = cfg.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise _refuse(where, "layer_types", sorted(set(layer_types)), "sliding-window attention in some layers: "
                      "NeoX's attention is full causal", "import a model whose layers all use full_attention")
    window = cfg.get("sliding_window")
    in_use = cfg.get("use_sliding_window", name == "MistralForCausalLM")
    if in_use and window is not None and window < cfg.get("max_position_embeddings", math.inf):
        raise _refuse(where, "sliding_window", window, f"attention limited to the last {window} tokens, which "
                      "NeoX cannot represent", f"set it to null in config.json if the model is only used on "
                      f"sequences of at most {window} tokens (attention is then the same)")


def shape_from_hf_config(cfg: dict, where: str | Path = "config.json", *, tp: int = 1, pp: int = 1) -> ModelShape:
    """The NeoX `ModelShape` that computes what transformers computes for `cfg`, or a one-line UserError.

    Vocab: `padded_vocab_size` = the HF embedding rows (`vocab_size`); `make_vocab_size_divisible_by` is the
    largest of 128, 64, ..., 1 that makes NeoX pad exactly to it (see `divisible_by_for`)."""
    where = Path(where)
    name = _architecture(cfg, where)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(cfg.get(key), int):
            raise _refuse(where, key, cfg.get(key), "expected an integer", "restore config.json")
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if h % heads:
        raise _refuse(where, "num_attention_heads", heads, f"does not divide hidden_size {h}", "restore config.json")
    if cfg.get("head_dim") not in (None, h // heads):
        raise _refuse(where, "head_dim", cfg["head_dim"], f"NeoX's head size is hidden_size / num_attention_heads "
                      f"= {h // heads}", "import a model with head_dim = hidden_size / num_attention_heads")
    base, pct = _rope(cfg, where)
    act = cfg.get("hidden_act", "silu" if name in LLAMA_FAMILY else "gelu")
    kv = cfg.get("num_key_value_heads") or heads
    common = dict(hidden_size=h, num_layers=cfg["num_hidden_layers"], num_heads=heads, ffn_size=cfg["intermediate_size"],
                  padded_vocab_size=cfg["vocab_size"], rotary_emb_base=base, tp=tp, pp=pp,
                  make_vocab_size_divisible_by=divisible_by_for(cfg["vocab_size"], tp),
                  max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
                  params_dtype=HF_DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype")), "float32"))
    common["seq_length"] = common["max_position_embeddings"]  # NeoX's RoPE cache length; a config may lower it
    if name in LLAMA_FAMILY:
        if act != "silu":
            raise _refuse(where, "hidden_act", act, "NeoX's gated MLP is SwiGLU (silu)", "import a silu model")
        if pct != 1:
            raise _refuse(where, "partial_rotary_factor", pct, "a Llama-family model rotates every head dimension "
                          "in transformers", "restore config.json")
        _sliding_window(cfg, name, where)
        qwen = name == "Qwen2ForCausalLM"
        attn_bias = True if qwen else bool(cfg.get("attention_bias", False))
        return ModelShape(num_kv_heads=kv, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), attn_bias=attn_bias,
                          mlp_bias=bool(cfg.get("mlp_bias", False)), **common)
    if kv != heads:
        raise _refuse(where, "num_key_value_heads", kv, "GPTNeoX has no grouped-query attention", "restore config.json")
    if act not in ("gelu", *TANH_GELU):
        raise _refuse(where, "hidden_act", act, "NeoX's classic MLP computes GeLU (erf, or tanh with "
                      "bias_gelu_fusion)", "import a model with gelu or gelu_pytorch_tanh")
    return ModelShape(num_kv_heads=heads, norm="layernorm", activation="gelu", pos_emb="rotary",
                      gelu_approx="tanh" if act in TANH_GELU else "erf", rotary_pct=pct,
                      layernorm_eps=float(cfg.get("layer_norm_eps", 1e-5)),
                      parallel_residual=bool(cfg.get("use_parallel_residual", True)),
                      attn_bias=bool(cfg.get("attention_bias", True)), mlp_bias=True, **common)


def divisible_by_for(rows: int, tp: int, tokenizer_size: int | None = None) -> int:
    """The largest `make_vocab_size_divisible_by` in 128, 64, ..., 1 with which NeoX pads the tokenizer's size
    (`rows` when unknown) to exactly `rows` at this TP; `rows // tp` if none does (it always does)."""
    size = rows if tokenizer_size is None else tokenizer_size
    for d in (128, 64, 32, 16, 8, 4, 2, 1):
        if rows % (d * tp) == 0 and d * tp * math.ceil(size / (d * tp)) == rows:
            return d
    return rows // tp


# Fields of a NeoX config that must equal the HF model's (a NeoX config given with --config is checked).
MATCHED = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "ffn_size", "norm", "activation", "pos_emb",
           "parallel_residual", "attn_bias", "mlp_bias", "rotary_pct", "rotary_emb_base")
NEOX_NAME = {"num_heads": "num_attention_heads", "ffn_size": "intermediate_size (as the FFN width)",
             "parallel_residual": "gpt_j_residual", "attn_bias": "use_bias_in_attn_linear",
             "mlp_bias": "use_bias_in_mlp", "norm_eps": "rms_norm_epsilon / layernorm_epsilon",
             "gelu_approx": "bias_gelu_fusion", "padded_vocab_size": "the padded vocab"}


def check_same_model(hf: ModelShape, neox: ModelShape, where: str | Path) -> ModelShape:
    """UserError naming the first NeoX config field that makes `neox` compute another model than `hf`;
    returns `neox` with the HF vocab rows filled in."""
    fields = [*MATCHED, "norm_eps", *(("gelu_approx",) if not hf.gated else ())]
    if neox.padded_vocab_size is not None:
        fields.append("padded_vocab_size")
    for f in fields:
        a, b = getattr(hf, f), getattr(neox, f)
        if a != b:
            extra = ""
            if f == "padded_vocab_size":
                extra = f" (set make_vocab_size_divisible_by: {divisible_by_for(a, neox.tp, neox.vocab_size)})"
            raise UserError(f"{where}: {NEOX_NAME.get(f, f)} gives {b!r} but the HF model has {a!r}; the NeoX config "
                            f"does not describe this model: fix it{extra}, or let --write-config write it")
    return neox.replace(padded_vocab_size=hf.padded_vocab_size)
