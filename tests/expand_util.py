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


# ---- the literal operators of EXPANSION_SPEC section 1, written out by hand (loops over target units) ----
# They exist only to check the package's rules (index gathers with block copies) against the spec's text.
def counts_of(g) -> dict[int, int]:
    out: dict[int, int] = {}
    for i in g.tolist():
        out[i] = out.get(i, 0) + 1
    return out


def first_seen(g) -> list[bool]:
    """False at the first occurrence of each source unit, True at later ones (AKI's new units)."""
    seen, out = set(), []
    for i in g.tolist():
        out.append(i in seen)
        seen.add(i)
    return out


def in_h(w: torch.Tensor, g) -> torch.Tensor:
    """IN_h(W)[:, k] = W[:, g(k)] / c(g(k))."""
    c = counts_of(g)
    return torch.stack([w[:, i] / c[i] for i in g.tolist()], dim=1)


def out_h(w: torch.Tensor, g, a) -> torch.Tensor:
    """OUT_h(W)[k, ...] = a_k W[g(k), ...] (matrix or bias)."""
    return torch.stack([float(a[k]) * w[i] for k, i in enumerate(g.tolist())])


def norm_h(gamma: torch.Tensor, g, a) -> torch.Tensor:
    """NORM_h(gamma)[k] = gamma[g(k)] / a_k."""
    return torch.stack([gamma[i] / float(a[k]) for k, i in enumerate(g.tolist())])


def rows_units(w: torch.Tensor, g, block: int) -> torch.Tensor:
    """ROWS_H / ROWS_f: whole blocks of `block` rows (a head's dh rows, one FFN row), never split."""
    return torch.cat([w[i * block:(i + 1) * block] for i in g.tolist()])


def cols_units(w: torch.Tensor, g, block: int) -> torch.Tensor:
    """COLS_H / COLS_f: whole column blocks divided by the unit's count."""
    c = counts_of(g)
    return torch.cat([w[:, i * block:(i + 1) * block] / c[i] for i in g.tolist()], dim=1)


def pick(cur: torch.Tensor, upper: torch.Tensor, g, block: int, dim: int = 0) -> torch.Tensor:
    """`cur`, except the blocks of new units (AKI) taken from `upper`, along `dim`."""
    out = cur.clone()
    for j, new in enumerate(first_seen(g)):
        if new:
            sl = slice(j * block, (j + 1) * block)
            if dim == 0:
                out[sl] = upper[sl]
            else:
                out[:, sl] = upper[:, sl]
    return out
