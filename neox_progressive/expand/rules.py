"""The expansion rules: one small pure function per tensor role, registered by name.

Each logical tensor has a role (`arch.LAYER_ROLES`, `arch.MODEL_ROLES`: data, per key), each role
names a rule here, and a rule is `(src: Sources, maps: Maps, opt: RuleOptions) -> tensor`. The
planner (plan.py) lists per target tensor its rule, source keys and maps; the executor (run.py)
calls `RULES[op.rule]`. A new architecture adds rows to the role table, and a rule only where a
tensor does something no existing role does. Torch convention W[out, in]; EXPANSION_SPEC.md sec. 1:

    reads_hidden      W'  = IN_h(ROWS_u(W))          Wq, Wk, Wv (u = heads / kv heads, whole dh-row
                                                     blocks), W_gate, W_up / NeoX linear1 (u = FFN rows)
    unit_bias         b'  = ROWS_u(b)                their biases: rows follow the units, no 1/c
    writes_residual   W'  = OUT_h(COLS_u(W))         Wo (head column blocks / c_H), W_down / linear2 (/ c_f)
    residual_bias     b'  = OUT_h(b) = a . b[g_h]    biases of Wo and W_down (added to the residual stream)
    norm_scale        g'  = NORM_h(g) = g[g_h] / a   RMSNorm scale, LayerNorm gamma
    norm_bias         be' = be[g_h]                  LayerNorm beta (a = 1 whenever a LayerNorm exists)
    embedding         E'[v, k] = a_k E[v, g_h(k)]    word embedding (rows re-padded, new rows 0) and the
                                                     learned position embedding (rows unchanged)
    head              H'  = IN_h(H)                  untied output head (rows re-padded)
    zero_writer       0                              Wo, W_down and their biases of an added layer under
                                                     new_layer_init=zero_out (the layer is the identity)

with IN_h(W)[:, k] = W[:, g_h(k)] / c_h(g_h(k)), OUT_h(W)[k, :] = a_k W[g_h(k), :], and the residual
scale a_k = sqrt((h'/h) / c_h(g_h(k))) under rms_comp=exact, else 1.

AKI (bert2BERT; EXPANSION_SPEC sec. 5): `Sources.upper` is source layer l+1 (None for FPI and for the
top layer). reads_hidden and unit_bias take the rows of the new units (N: positions whose source unit
already occurred earlier in the map) from IN_h(ROWS_u(upper)); writes_residual takes the columns of
new units from the upper layer under aki_second=upper and the rows of new hidden units under
aki_hidden=upper (residual_bias follows aki_hidden); norms, embeddings and the head are FPI.

NeoX's classic transformer (Pythia; issue 11) needs no rule of its own, only roles:

- LayerNorm (g, be): with x'_k = a_k x_{g_h(k)}, mu' = (1/h') sum_i c_i a_i x_i and
  var' = (1/h') sum_i c_i a_i^2 x_i^2 - mu'^2. With every c_i = h'/h (integer width ratio and
  map_sampling=balanced) and a = 1, mu' = mu and var' = var, so g' = g[g_h], be' = be[g_h] copy the
  output exactly. Otherwise FPI is bert2BERT's approximation (the plan says `exact: false`). The
  RMSNorm compensation a_i = sqrt((h'/h)/c_i) keeps the mean square but not the mean (mu' =
  (1/h') sum_i sqrt((h'/h) c_i) x_i != mu), and the output (a_k x_g - mu') / sigma' would need
  mu' = a_k mu for every k; no per-coordinate scale gives that when the counts differ, so
  rms_comp=exact is refused for LayerNorm models (plan.py), which makes a = 1 and be' = be[g_h] the rule.
- GeLU MLP: linear1 [F, h] is reads_hidden over the FFN rows (the SwiGLU rule without the gate, so
  copied neurons compute the same gelu), its bias unit_bias; linear2 is writes_residual, its bias
  residual_bias.
- Parallel residual (gpt_j_residual): x + attn(ln1(x)) + mlp(ln2(x)); each matrix keeps its own rule,
  and both sums stay copies of the source's.
- Partial rotary (rotary_pct < 1): head_dim is fixed and head blocks are copied whole, so the rotary
  dimensions of every head are unchanged.

Math runs in fp32 (fp64 for fp64 sources); every rule casts once to `opt.dtype`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from neox_progressive.expand.maps import new_units


@dataclass(frozen=True)
class Unit:
    """A unit map as tensors: g (target -> source), c (source counts), new (AKI's N, bool)."""

    g: torch.Tensor
    c: torch.Tensor
    new: torch.Tensor

    @classmethod
    def of(cls, g, n: int) -> Unit:
        g = np.asarray(g)
        return cls(torch.from_numpy(g.copy()), torch.from_numpy(np.bincount(g, minlength=n)),
                   torch.from_numpy(new_units(g)))


@dataclass(frozen=True)
class Maps:
    """The maps one tensor's rule reads."""

    hidden: Unit
    """g_h, the one hidden-unit map of the model."""
    alpha: torch.Tensor
    """a_k per target hidden unit (float64; all 1 unless rms_comp is exact)."""
    units: Unit | None = None
    """The layer's heads, KV heads or FFN neurons along this tensor's unit dimension."""
    block: int = 1
    """Rows per unit: head_dim for heads (whole blocks, never split), 1 for FFN neurons."""
    rows: int | None = None
    """Target rows of an embedding or head (the source's rows first, new rows 0)."""


@dataclass(frozen=True)
class Sources:
    """The source tensor of layer l, and under AKI the same tensor of layer l+1 (else None)."""

    cur: torch.Tensor
    upper: torch.Tensor | None = None


@dataclass(frozen=True)
class RuleOptions:
    aki_second: str = "current"
    aki_hidden: str = "copy"
    dtype: torch.dtype | None = None
    """Output dtype (None: the source's)."""


Rule = Callable[[Sources, Maps, RuleOptions], torch.Tensor]
RULES: dict[str, Rule] = {}


def rule(*names: str) -> Callable[[Rule], Rule]:
    """Register a rule under one or more role names."""
    def register(fn: Rule) -> Rule:
        for name in names:
            if name in RULES:
                raise ValueError(f"rule {name!r} registered twice")
            RULES[name] = fn
        return fn
    return register


# ---- helpers -------------------------------------------------------------------------------
HALF = (torch.bfloat16, torch.float16)


def work_dtype(t: torch.Tensor) -> torch.dtype:
    """Math dtype: fp32, or fp64 for fp64 sources (EXPANSION_SPEC section 8)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _out(x: torch.Tensor, src: Sources, opt: RuleOptions) -> torch.Tensor:
    return x.to(opt.dtype or src.cur.dtype)


def unit_rows(units: Unit, block: int) -> torch.Tensor:
    """Source row of every target row along a unit dimension: whole blocks of `block` rows, never split."""
    return (units.g[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


def identity_prefix(idx: torch.Tensor) -> int:
    """Length p of the longest prefix with idx[:p] == 0..p-1 (bert2BERT maps keep the old units first)."""
    off = (idx != torch.arange(len(idx))).nonzero()
    return len(idx) if len(off) == 0 else int(off[0])


def gather(w: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None, work: torch.dtype | None) -> torch.Tensor:
    """w[rows][:, cols] in the source dtype (copies need no math) into a new tensor, then one conversion.

    The identity prefixes of the maps are block copies; only the new units are gathered, so the
    expansion touches each output byte once. The result never shares memory with `w`.
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
        if pc < n_cols:  # columns by advanced indexing: ~1.5x faster than index_select(1, ...) on CPU (same bits)
            out[:pr, pc:] = w[:pr, cols[pc:]]
        if pr < n_rows:
            part = w.index_select(0, rows[pr:])
            out[pr:] = part if cols is None else part[:, cols]
    return out if work is None else out.to(work)


def divide(x: torch.Tensor, counts: torch.Tensor, work: torch.dtype) -> torch.Tensor:
    """x / counts (integer counts broadcast over the last dim), equal to fp32 math cast once to x's dtype.

    For 16-bit x the division runs in place in x's dtype: PyTorch's bf16/fp16 kernels convert to fp32,
    divide and round once, and the counts are exact in 16 bits up to 256, so the result is the same
    bits as the fp32 route (tests/test_expand_ops.py checks) with a third of the memory traffic.
    """
    if x.dtype in HALF and float(counts.max()) <= 256:
        return x.div_(counts.to(x.dtype))
    return x.to(work).div_(counts)


# ---- per-layer rules -----------------------------------------------------------------------
@rule("reads_hidden", "unit_bias")
def reads_hidden(src: Sources, m: Maps, opt: RuleOptions) -> torch.Tensor:
    """IN_h(ROWS_u(W)) for a matrix, ROWS_u(b) for its bias; AKI: the new units' rows from layer l+1."""
    rows, new_rows = unit_rows(m.units, m.block), m.units.new.repeat_interleave(m.block)
    matrix = src.cur.dim() == 2
    work = work_dtype(src.cur)
    inv_h = m.hidden.c[m.hidden.g].to(work)                                   # c_h(g_h(k)) per target column

    def make(w, r):
        return divide(gather(w, r, m.hidden.g, None), inv_h, work) if matrix else gather(w, r, None, None)

    value = make(src.cur, rows)
    if src.upper is not None and bool(new_rows.any()):
        sel = new_rows.nonzero().squeeze(1)
        value[sel] = make(src.upper, rows[sel])
    return _out(value, src, opt)


@rule("writes_residual")
def writes_residual(src: Sources, m: Maps, opt: RuleOptions) -> torch.Tensor:
    """OUT_h(COLS_u(W)); AKI: aki_second=upper takes new units' columns, aki_hidden=upper new hidden rows, from l+1."""
    h, work = m.hidden, work_dtype(src.cur)
    a = m.alpha.to(work)
    scaled = bool((a != 1).any())
    cols = unit_rows(m.units, m.block)
    col_c = m.units.c[m.units.g].repeat_interleave(m.block).to(work)          # c_u(g_u(j)) per target column
    new_cols = m.units.new.repeat_interleave(m.block)

    def make(w, rsel, csel):
        x = gather(w, h.g[rsel], cols[csel], None)
        return x.to(work).div_(col_c[csel]).mul_(a[rsel][:, None]) if scaled else divide(x, col_c[csel], work)

    every = slice(None)
    value = make(src.cur, every, every)
    if src.upper is not None and opt.aki_second == "upper" and bool(new_cols.any()):
        value[:, new_cols] = make(src.upper, every, new_cols)
    if src.upper is not None and opt.aki_hidden == "upper" and bool(h.new.any()):
        value[h.new] = make(src.upper, h.new, every)
    return _out(value, src, opt)


@rule("residual_bias")
def residual_bias(src: Sources, m: Maps, opt: RuleOptions) -> torch.Tensor:
    """OUT_h(b)[k] = a_k b[g_h(k)]; AKI with aki_hidden=upper: new hidden rows from layer l+1."""
    work = work_dtype(src.cur)
    a = m.alpha.to(work)
    value = src.cur.to(work)[m.hidden.g] * a
    if src.upper is not None and opt.aki_hidden == "upper":
        value = torch.where(m.hidden.new, src.upper.to(work)[m.hidden.g] * a, value)
    return _out(value, src, opt)


@rule("norm_scale")
def norm_scale(src: Sources, m: Maps, opt: RuleOptions) -> torch.Tensor:
    """NORM_h(g)[k] = g[g_h(k)] / a_k: the norm output is a pure copy (a cancels the residual scale)."""
    work = work_dtype(src.cur)
    return _out(src.cur.to(work)[m.hidden.g] / m.alpha.to(work), src, opt)


@rule("norm_bias")
def norm_bias(src: Sources, m: Maps, opt: RuleOptions) -> torch.Tensor:
    """be'[k] = be[g_h(k)] (LayerNorm's beta; the planner keeps a = 1 for LayerNorm models)."""
    if bool((m.alpha != 1).any()):
        raise ValueError("norm_bias: a residual scale a != 1 cannot keep a LayerNorm's output (see the module docstring)")
    return _out(src.cur[m.hidden.g], src, opt)


@rule("zero_writer")
def zero_writer(src: Sources, m: Maps, opt: RuleOptions) -> torch.Tensor:
    """Zeros of a residual writer's target shape (an added layer under new_layer_init=zero_out)."""
    shape = (len(m.hidden.g),) if src.cur.dim() == 1 else (len(m.hidden.g), len(m.units.g) * m.block)
    return torch.zeros(shape, dtype=opt.dtype or src.cur.dtype)


# ---- embeddings and head (row chunks bound the memory of V x h' tensors) --------------------
@rule("embedding", "position_embedding")
def embedding(src: Sources, m: Maps, opt: RuleOptions, chunk: int = 8192) -> torch.Tensor:
    """E'[v, k] = a_k E[v, g_h(k)] (an out-dim copy of the columns), rows re-padded to `m.rows`."""
    w, h = src.cur, m.hidden
    work, dtype = work_dtype(w), opt.dtype or w.dtype
    if bool((m.alpha == 1).all()):  # a pure copy: no arithmetic, no conversion
        return _chunked(w, m.rows, dtype, chunk, lambda x: gather(x, None, h.g, None))
    a = m.alpha.to(work)
    return _chunked(w, m.rows, dtype, chunk, lambda x: gather(x, None, h.g, work).mul_(a))


@rule("head")
def head(src: Sources, m: Maps, opt: RuleOptions, chunk: int = 8192) -> torch.Tensor:
    """IN_h(H) of the untied head [V, h], rows re-padded to `m.rows`."""
    w, h = src.cur, m.hidden
    work = work_dtype(w)
    c = h.c[h.g].to(work)
    return _chunked(w, m.rows, opt.dtype or w.dtype, chunk, lambda x: divide(gather(x, None, h.g, None), c, work))


def _chunked(w, rows, out_dtype, chunk, fn):
    n = min(rows, w.shape[0])
    out = None
    for s in range(0, n, chunk):
        part = fn(w[s:min(s + chunk, n)])
        if out is None:
            out = torch.zeros(rows, part.shape[1], dtype=out_dtype)
        out[s:s + part.shape[0]] = part
    return out
