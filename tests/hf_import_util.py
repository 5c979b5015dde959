"""Tiny Hugging Face models built in-process from configs (no downloads) and saved with save_pretrained, for the
tests of HFReader, import-hf and the HF-native expansion. transformers' own forward pass is the independent
implementation the imports are checked against."""

from __future__ import annotations

from pathlib import Path

import torch

# name: (transformers config class, config kwargs, model class)
BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64)
MODELS = {
    "llama-mha": ("LlamaConfig", dict(num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=5000.0)),
    "llama-gqa": ("LlamaConfig", dict(num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0)),
    "llama-tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-bias": ("LlamaConfig", dict(num_key_value_heads=2, attention_bias=True)),
    "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, use_sliding_window=False, rope_theta=20000.0)),
    "gpt-neox": ("GPTNeoXConfig", dict(rotary_pct=0.25, hidden_act="gelu_pytorch_tanh", use_parallel_residual=True)),
    "gpt-neox-seq": ("GPTNeoXConfig", dict(rotary_pct=0.5, hidden_act="gelu", use_parallel_residual=False,
                                           attention_bias=False)),
}
MODEL_CLASS = {"LlamaConfig": "LlamaForCausalLM", "MistralConfig": "MistralForCausalLM",
               "Qwen2Config": "Qwen2ForCausalLM", "GPTNeoXConfig": "GPTNeoXForCausalLM"}


def build(name: str, seed: int = 0, **over):
    """A transformers model of `MODELS[name]` with random weights at a scale where layout mistakes show."""
    import transformers

    cls, kw = MODELS[name]
    cfg = getattr(transformers, cls)(**{**BASE, **kw, **over})
    if cls == "GPTNeoXConfig" and hasattr(cfg, "rope_parameters") and cfg.rope_parameters is not None:
        cfg.rope_parameters["partial_rotary_factor"] = kw["rotary_pct"]  # 5.x keeps it there
    torch.manual_seed(seed)
    model = getattr(transformers, MODEL_CLASS[cls])(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.3)
    return model


def save(model, path: Path, **kw) -> Path:
    model.save_pretrained(path, **kw)
    return path


def tokens(vocab: int = 96, n: int = 2, t: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(x).logits.float()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def ours(shape, sd, x: torch.Tensor) -> torch.Tensor:
    from neox_progressive.model import Transformer

    return Transformer.from_state_dict(shape, {k: v.float() for k, v in sd.items()})(x)
