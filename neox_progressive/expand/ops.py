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


def head_rows(units: Unit, d: int) -> torch.Tensor:
    """Source row of every target row of a head-blocked matrix: whole dh-row blocks, never split."""
    return (units.g[:, None] * d + torch.arange(d)[None, :]).reshape(-1)


def identity_prefix(idx: torch.Tensor) -> int:
    """Length p of the longest prefix with idx[:p] == 0..p-1 (bert2BERT maps keep the old units first)."""
    off = (idx != torch.arange(len(idx))).nonzero()
    return len(idx) if len(off) == 0 else int(off[0])


def _gather(w: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None, work: torch.dtype | None) -> torch.Tensor:
    """w[rows][:, cols] in the source dtype (copies need no math), then one conversion to the math dtype.

    The identity prefixes of the maps are block copies; only the new units are gathered, so the
    expansion touches each output byte once.
    """
    n_rows = w.shape[0] if rows is None else len(rows)
    pr = n_rows if rows is None else identity_prefix(rows)
    if w.dim() == 1:
        out = torch.empty(n_rows, dtype=w.dtype)
        out[:pr] = w[:pr]
        if pr < n_rows:
            out[pr:] = w.index_select(0, rows[pr:])
    else:
        n_cols = w.shape[1] if cols is None else len(cols)
        pc = n_cols if cols is None else identity_prefix(cols)
        out = torch.empty(n_rows, n_cols, dtype=w.dtype)
        out[:pr, :pc] = w[:pr, :pc]
        if pc < n_cols:
            out[:pr, pc:] = w[:pr].index_select(1, cols[pc:])
        if pr < n_rows:
            part = w.index_select(0, rows[pr:])
            out[pr:] = part if cols is None else part.index_select(1, cols)
    return out if work is None else out.to(work)


HALF = (torch.bfloat16, torch.float16)


def divide(x: torch.Tensor, counts: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """x / counts (integer counts broadcast over the last dim), equal to fp32 math cast once to x's dtype.

    For 16-bit x the division runs in place in x's dtype: PyTorch's bf16/fp16 kernels convert to fp32,
    divide and round once, and the counts are exact in 16 bits up to 256, so the result is the same
    bits as the fp32 route (tests/test_expand_ops.py checks) with a third of the memory traffic.
    """
    if x.dtype in HALF and float(counts.max()) <= 256:
        return x.div_(counts.to(x.dtype))
    return x.to(work).div_(counts)


def widen_layer(cur: dict[str, torch.Tensor], upper: dict[str, torch.Tensor] | None, u: LayerUnits, *,
                aki_second: str = "current", aki_hidden: str = "copy", out_dtype: torch.dtype | None = None,
                ) -> dict[str, torch.Tensor]:
    """One logical layer widened by FPI (upper None) or AKI (upper = source layer l+1).

    The rules of `in_h` / `out_h` / `rows_heads` / `cols_heads` / `rows_f` / `cols_f` written as index
    gathers: each target entry is one source entry times at most two scale factors, computed in fp32
    (fp64 for fp64 sources) and cast once. Under AKI only the new units' rows (or columns) are read
    from the upper layer.
    """
    work = torch.float64 if cur["attn.q.weight"].dtype == torch.float64 else torch.float32
    out_dtype = out_dtype or cur["attn.q.weight"].dtype
    d, h = u.head_dim, u.hidden
    a = u.alpha.to(work)
    scaled = bool((a != 1).any())
    inv_h = h.c[h.g].to(work)                      # c_h(g_h(k)) per target hidden column

    def first(key, rows: torch.Tensor, new_rows: torch.Tensor, in_dim: bool):
        """IN_h(ROWS(W)) (or ROWS(b) for a bias); AKI: the new units' rows from the upper layer."""
        cols = h.g if in_dim else None

        def make(w, r):
            x = _gather(w, r, cols, None)
            return divide(x, inv_h, work) if in_dim else x

        value = make(cur[key], rows)
        if upper is not None and bool(new_rows.any()):
            sel = new_rows.nonzero().squeeze(1)
            value[sel] = make(upper[key], rows[sel])
        return value

    def second(key, cols: torch.Tensor, col_c: torch.Tensor, new_cols: torch.Tensor):
        """OUT_h(COLS(W)): residual writer; aki_second / aki_hidden take parts from the upper layer."""
        def make(w, rsel, csel):
            x = _gather(w, h.g[rsel], cols[csel], None)
            return x.to(work).div_(col_c[csel]).mul_(a[rsel][:, None]) if scaled else divide(x, col_c[csel], work)

        every = slice(None)
        value = make(cur[key], every, every)
        if upper is not None and aki_second == "upper" and bool(new_cols.any()):
            value[:, new_cols] = make(upper[key], every, new_cols)
        if upper is not None and aki_hidden == "upper" and bool(h.new.any()):
            value[h.new] = make(upper[key], h.new, every)
        return value

    def writer_bias(key):
        value = out_h(cur[key].to(work), h, a)
        if upper is not None and aki_hidden == "upper":
            value = pick_rows(value, out_h(upper[key].to(work), h, a), h.new)
        return value

    out = {"attn_norm.weight": norm_h(cur["attn_norm.weight"].to(work), h, a),
           "mlp_norm.weight": norm_h(cur["mlp_norm.weight"].to(work), h, a)}
    for name, units in (("q", u.heads), ("k", u.kv_heads), ("v", u.kv_heads)):
        rows, new_rows = head_rows(units, d), units.new.repeat_interleave(d)
        out[f"attn.{name}.weight"] = first(f"attn.{name}.weight", rows, new_rows, True)
        if f"attn.{name}.bias" in cur:
            out[f"attn.{name}.bias"] = first(f"attn.{name}.bias", rows, new_rows, False)
    head_c = u.heads.c[u.heads.g].repeat_interleave(d).to(work)
    out["attn.o.weight"] = second("attn.o.weight", head_rows(u.heads, d), head_c, u.heads.new.repeat_interleave(d))
    if "attn.o.bias" in cur:
        out["attn.o.bias"] = writer_bias("attn.o.bias")
    for name in ("gate", "up"):
        out[f"mlp.{name}.weight"] = first(f"mlp.{name}.weight", u.ffn.g, u.ffn.new, True)
        if f"mlp.{name}.bias" in cur:
            out[f"mlp.{name}.bias"] = first(f"mlp.{name}.bias", u.ffn.g, u.ffn.new, False)
    out["mlp.down.weight"] = second("mlp.down.weight", u.ffn.g, u.ffn.c[u.ffn.g].to(work), u.ffn.new)
    if "mlp.down.bias" in cur:
        out["mlp.down.bias"] = writer_bias("mlp.down.bias")
    return {k: out[k].to(out_dtype) for k in cur}


def zero_out(layer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An added layer that is the identity: residual writers (Wo, W_down and their biases) set to 0."""
    writers = ("attn.o.weight", "attn.o.bias", "mlp.down.weight", "mlp.down.bias")
    return {k: (torch.zeros_like(v) if k in writers else v) for k, v in layer.items()}


def widen_rows_in_h(w: torch.Tensor, h: Unit, rows: int, out_dtype: torch.dtype, chunk: int = 8192) -> torch.Tensor:
    """IN_h of a [V, h] matrix (the head), re-padded to `rows` (new rows 0), in row chunks to bound memory."""
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    c = h.c[h.g].to(work)
    return _chunked(w, rows, out_dtype, chunk, lambda x: divide(_gather(x, None, h.g, None), c, work))


def widen_rows_out_h(w: torch.Tensor, h: Unit, a: torch.Tensor, rows: int, out_dtype: torch.dtype,
                     chunk: int = 8192) -> torch.Tensor:
    """E'[v, k] = a_k E[v, g_h(k)] (out-dim copy of the embedding columns), re-padded to `rows`."""
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    if bool((a == 1).all()):  # a pure copy: no arithmetic, no conversion
        return _chunked(w, rows, out_dtype, chunk, lambda x: _gather(x, None, h.g, None))
    a = a.to(work)
    return _chunked(w, rows, out_dtype, chunk, lambda x: _gather(x, None, h.g, work).mul_(a))


def _chunked(w, rows, out_dtype, chunk, fn):
    n = min(rows, w.shape[0])
    out = None
    for s in range(0, n, chunk):
        part = fn(w[s:min(s + chunk, n)])
        if out is None:
            out = torch.zeros(rows, part.shape[1], dtype=out_dtype)
        out[s:s + part.shape[0]] = part
    return out
