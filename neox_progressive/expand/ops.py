"""Pure tensor operations of the expansion (EXPANSION_SPEC sections 1, 3, 5), torch convention W[out, in].

    IN_h(W)[:, k]      = W[:, g_h(k)] / c_h(g_h(k))      matrices that read the normed hidden state
    OUT_h(W)[k, :]     = a_k W[g_h(k), :]                  matrices that write the residual stream
    NORM_h(g)[k]       = g[g_h(k)] / a_k
    ROWS_H(W)[(j,d),:] = W[(g(j),d), :]                    whole head blocks, never split
    COLS_H(W)[:,(j,d)] = W[:, (g(j),d)] / c(g(j))
    ROWS_f(W)[m, :]    = W[g_f(m), :]                      the same g_f for gate and up
    COLS_f(W)[:, m]    = W[:, g_f(m)] / c_f(g_f(m))

AKI (bert2BERT eq. for "advanced knowledge initialization"): the rows of the new units (positions
whose source unit already occurred earlier in the map) come from the upper source layer l+1,
widened with the same maps; the top layer (no l+1) is FPI. The maps are layer l's maps applied to
layer l+1's units (every source layer has the same shapes).

Math runs in fp32 (fp64 for fp64 sources); `widen_layer` casts once to the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Unit:
    """A unit map as tensors: g (target -> source), c (source counts), new (AKI's N, bool)."""

    g: torch.Tensor
    c: torch.Tensor
    new: torch.Tensor

    @classmethod
    def of(cls, g, n: int) -> Unit:
        import numpy as np

        from neox_progressive.expand.maps import new_units

        g = np.asarray(g)
        return cls(torch.from_numpy(g.copy()), torch.from_numpy(np.bincount(g, minlength=n)), torch.from_numpy(new_units(g)))


def in_h(w: torch.Tensor, h: Unit) -> torch.Tensor:
    return w[:, h.g] / h.c[h.g].to(w.dtype)


def out_h(w: torch.Tensor, h: Unit, a: torch.Tensor) -> torch.Tensor:
    """Rows of a residual writer (matrix [h, *] or bias [h])."""
    rows = w[h.g]
    return rows * a.to(w.dtype).reshape(-1, *([1] * (w.dim() - 1)))


def norm_h(gamma: torch.Tensor, h: Unit, a: torch.Tensor) -> torch.Tensor:
    return gamma[h.g] / a.to(gamma.dtype)


def rows_heads(w: torch.Tensor, heads: Unit, d: int) -> torch.Tensor:
    """Whole head blocks of rows (weight [n*d, *] or bias [n*d])."""
    tail = w.shape[1:]
    return w.reshape(-1, d, *tail)[heads.g].reshape(len(heads.g) * d, *tail)


def cols_heads(w: torch.Tensor, heads: Unit, d: int) -> torch.Tensor:
    blocks = w.reshape(w.shape[0], -1, d)[:, heads.g] / heads.c[heads.g].to(w.dtype)[None, :, None]
    return blocks.reshape(w.shape[0], len(heads.g) * d)


def rows_f(w: torch.Tensor, f: Unit) -> torch.Tensor:
    return w[f.g]


def cols_f(w: torch.Tensor, f: Unit) -> torch.Tensor:
    return w[:, f.g] / f.c[f.g].to(w.dtype)


def pick_rows(cur: torch.Tensor, upper: torch.Tensor, new: torch.Tensor, block: int = 1) -> torch.Tensor:
    """Rows of `cur`, except the new units' rows (blocks of `block` rows) taken from `upper`."""
    mask = new.repeat_interleave(block).reshape(-1, *([1] * (cur.dim() - 1)))
    return torch.where(mask, upper, cur)


def pick_cols(cur: torch.Tensor, upper: torch.Tensor, new: torch.Tensor, block: int = 1) -> torch.Tensor:
    return torch.where(new.repeat_interleave(block)[None, :], upper, cur)


@dataclass(frozen=True)
class LayerUnits:
    hidden: Unit
    heads: Unit
    kv_heads: Unit
    ffn: Unit
    alpha: torch.Tensor
    head_dim: int


def widen_layer(cur: dict[str, torch.Tensor], upper: dict[str, torch.Tensor] | None, u: LayerUnits, *,
                aki_second: str = "current", aki_hidden: str = "copy", out_dtype: torch.dtype | None = None,
                ) -> dict[str, torch.Tensor]:
    """One logical layer widened by FPI (upper None) or AKI (upper = source layer l+1)."""
    work = torch.float64 if cur["attn.q.weight"].dtype == torch.float64 else torch.float32
    out_dtype = out_dtype or cur["attn.q.weight"].dtype
    d, h, a = u.head_dim, u.hidden, u.alpha.to(work)

    def get(sd, key):
        return None if sd is None else sd[key].to(work)

    def first(key, fn, new: Unit | None, block=1):
        """First matrix (or bias): rows of new units from the upper layer under AKI."""
        value = fn(get(cur, key))
        if upper is not None and new is not None and bool(new.new.any()):
            value = pick_rows(value, fn(get(upper, key)), new.new, block)
        return value

    def second(key, cols, units: Unit, block=1):
        """Residual writer: OUT_h(COLS(W)); aki_second / aki_hidden choose the upper layer's parts."""
        value = cols(get(cur, key))
        if upper is not None and aki_second == "upper":
            value = pick_cols(value, cols(get(upper, key)), units.new, block)
        value = out_h(value, h, a)
        if upper is not None and aki_hidden == "upper":
            value = pick_rows(value, out_h(cols(get(upper, key)), h, a), h.new)
        return value

    def writer_bias(key):
        value = out_h(get(cur, key), h, a)
        if upper is not None and aki_hidden == "upper":
            value = pick_rows(value, out_h(get(upper, key), h, a), h.new)
        return value

    out = {"attn_norm.weight": norm_h(get(cur, "attn_norm.weight"), h, a),
           "mlp_norm.weight": norm_h(get(cur, "mlp_norm.weight"), h, a)}
    for name, units in (("q", u.heads), ("k", u.kv_heads), ("v", u.kv_heads)):
        out[f"attn.{name}.weight"] = first(f"attn.{name}.weight", lambda w, n=units: in_h(rows_heads(w, n, d), h), units, d)
        if f"attn.{name}.bias" in cur:
            out[f"attn.{name}.bias"] = first(f"attn.{name}.bias", lambda w, n=units: rows_heads(w, n, d), units, d)
    out["attn.o.weight"] = second("attn.o.weight", lambda w: cols_heads(w, u.heads, d), u.heads, d)
    if "attn.o.bias" in cur:
        out["attn.o.bias"] = writer_bias("attn.o.bias")
    for name in ("gate", "up"):
        out[f"mlp.{name}.weight"] = first(f"mlp.{name}.weight", lambda w: in_h(rows_f(w, u.ffn), h), u.ffn)
        if f"mlp.{name}.bias" in cur:
            out[f"mlp.{name}.bias"] = first(f"mlp.{name}.bias", lambda w: rows_f(w, u.ffn), u.ffn)
    out["mlp.down.weight"] = second("mlp.down.weight", lambda w: cols_f(w, u.ffn), u.ffn)
    if "mlp.down.bias" in cur:
        out["mlp.down.bias"] = writer_bias("mlp.down.bias")
    return {k: out[k].to(out_dtype).contiguous() for k in cur}


def zero_out(layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An added layer that is the identity: residual writers (Wo, W_down and their biases) set to 0."""
    writers = ("attn.o.weight", "attn.o.bias", "mlp.down.weight", "mlp.down.bias")
    return {k: (torch.zeros_like(v) if k in writers else v) for k, v in layer.items()}


def widen_rows_in_h(w: torch.Tensor, h: Unit, rows: int, out_dtype: torch.dtype, chunk: int = 8192) -> torch.Tensor:
    """IN_h of a [V, h] matrix (the head), re-padded to `rows` (new rows 0), in row chunks to bound memory."""
    return _chunked(w, rows, out_dtype, chunk, lambda x: in_h(x, h))


def widen_rows_out_h(w: torch.Tensor, h: Unit, a: torch.Tensor, rows: int, out_dtype: torch.dtype,
                     chunk: int = 8192) -> torch.Tensor:
    """E'[v, k] = a_k E[v, g_h(k)] (out-dim copy of the embedding columns), re-padded to `rows`."""
    return _chunked(w, rows, out_dtype, chunk, lambda x: x[:, h.g] * a.to(x.dtype)[None, :])


def _chunked(w, rows, out_dtype, chunk, fn):
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    n = min(rows, w.shape[0])
    width = None
    out = None
    for s in range(0, n, chunk):
        part = fn(w[s:min(s + chunk, n)].to(work))
        if out is None:
            width = part.shape[1]
            out = torch.zeros(rows, width, dtype=out_dtype)
        out[s:s + part.shape[0]] = part.to(out_dtype)
    return out
