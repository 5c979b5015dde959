"""Helpers for the expansion tests: tiny source checkpoints + YAMLs, expansion, logits of both sides."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import random_sd, tiny_shape, write_yaml

from neox_progressive.config import ModelShape
from neox_progressive.expand import ExpandOptions, expand_checkpoint
from neox_progressive.io.reader import read_checkpoint
from neox_progressive.io.writer import write_checkpoint
from neox_progressive.model import Transformer

BASE = dict(make_vocab_size_divisible_by=32)


def shape(**kw) -> ModelShape:
    return tiny_shape(**(BASE | kw))


def wider(src: ModelShape, heads: int, kv: int | None = None, ffn: int | None = None, **kw) -> ModelShape:
    """The source shape with more heads (head_dim fixed) and optionally a wider FFN."""
    return src.replace(hidden_size=heads * src.head_dim, num_heads=heads, num_kv_heads=kv or heads,
                       ffn_size=ffn or src.ffn_size, padded_vocab_size=None, **kw)


def write_source(tmp: Path, src: ModelShape, sd: dict | None = None, seed: int = 0, std: float = 0.3) -> tuple[Path, Path, dict]:
    sd = sd if sd is not None else random_sd(src, seed=seed, std=std)
    write_checkpoint(tmp / "src", src, sd)
    return tmp / "src", write_yaml(tmp / "src.yml", src), sd


def run_expand(tmp: Path, src: ModelShape, dst: ModelShape, name: str = "out", *, sd: dict | None = None,
               stage: str = "", **options) -> tuple[Path, dict, dict, ModelShape, dict]:
    """Expand a random (or given) source; returns (out dir, record, source sd, target shape, target sd)."""
    src_dir = tmp / "src"
    if not src_dir.exists() or sd is not None:
        src_dir, src_yml, sd = write_source(tmp, src, sd)
    else:
        src_yml = tmp / "src.yml"
        sd = read_checkpoint(src_dir, src)[1]
    dst_yml = write_yaml(tmp / f"{name}.yml", dst)
    out = tmp / name
    record = expand_checkpoint(src_dir, [src_yml], [dst_yml], out, ExpandOptions(**options), quiet=True, stage=stage)
    dst_shape, dst_sd = read_checkpoint(out, [dst_yml])
    return out, record, sd, dst_shape, dst_sd


def tokens(shape: ModelShape, n: int = 2, t: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, shape.padded_vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(shape: ModelShape, sd: dict, x: torch.Tensor) -> torch.Tensor:
    return Transformer.from_state_dict(shape, {k: v.clone() for k, v in sd.items()})(x)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())
