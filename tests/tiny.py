"""Tiny models for tests: shapes, random logical weights, NeoX YAML files (no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from neox_progressive.config import ModelShape
from neox_progressive.model import Transformer


def tiny_shape(**kw) -> ModelShape:
    base = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4, ffn_size=48, padded_vocab_size=64,
                rms_norm_eps=1e-5, tp=1, pp=1)
    base.update(kw)
    return ModelShape(**base)


def random_sd(shape: ModelShape, seed: int = 0, std: float = 0.3, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Logical weights drawn at a scale where layout mistakes change the logits visibly."""
    with torch.device("meta"):
        names = {k: v.shape for k, v in Transformer(shape).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in names.items():
        t = torch.randn(s, generator=g, dtype=torch.float64) * std
        if k.endswith("norm.weight"):
            t = 1 + t
        out[k] = t.to(dtype)
    return out


def model_of(shape: ModelShape, sd: dict[str, torch.Tensor]) -> Transformer:
    return Transformer.from_state_dict(shape, {k: v.clone() for k, v in sd.items()})


def write_yaml(path: Path, shape: ModelShape, **extra) -> Path:
    cfg = shape.to_neox()
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
