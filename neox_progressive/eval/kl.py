"""KL divergence between the next-token distributions of two family members (paper Section 5.2, App. F).

Yano et al. 2025, App. F: at every token position t of an example x, a KL divergence between
the two members' next-token distributions over the vocabulary V, then the mean over the
positions of the example, then the mean over the examples (10,000 validation examples). The
formula's symbols did not survive in the paper text we have, so its direction is *our reading*:
the headline figure is

    KL_t = KL(p_small || p_large) = sum_{v in V} p_small(v | x_<=t) (log p_small(v | x_<=t) - log p_large(v | x_<=t)),

the smaller (earlier, draft) member first and the larger one as the reference, the direction
of knowledge-distillation and speculative-decoding analyses where the draft's proposals are
judged against the target. KL is not symmetric, so the other direction KL(p_large || p_small)
is always computed alongside, with the same averaging (`KLResult.reverse`), together with the
top-1 agreement (the share of positions where both members' most likely token is the same) and
the distribution of the per-example values (median, 90/99/99.9th percentiles, max).

Averaging is two-level, as App. F says: an example's value is the mean over its own positions,
and the result is the mean over examples, so a short example weighs as much as a long one. The
flat mean over all tokens (`KLResult.token_mean`) is kept for comparison; it differs whenever
examples have different lengths.

Memory and speed: neither model's logits are ever held for a whole batch. Each model runs its
trunk (embedding, layers, final norm) once, giving hidden states; only the positions that belong
to an example are kept (padding is dropped), and the output heads are then applied to
`position_chunk` rows at a time (default `scoring.chunk_rows`: a 64 MB float32 block on CPU, 256
MB on GPUs), written into three buffers reused for every block (both models' logits and their
difference). Per row, with a, b the two logit vectors and Z their normalisers:

    KL(p_small || p_large) = E_p[a - b] - (log Z_a - log Z_b),   KL(p_large || p_small) = E_q[b - a] + (log Z_a - log Z_b),

so both directions, the top-1 agreement and the log-normalisers come from about nine passes over
the block (the old one-direction log-softmax path needed ten). With `vocab_chunk` the vocabulary
is also split: an online log-sum-exp folds in [position_chunk, vocab_chunk] blocks one at a time.

Only the tokenizer's real vocabulary is compared (`vocab_size`): the rows NeoX pads the embedding
and head with (`make_vocab_size_divisible_by` x TP) can never be a real token, and two members of
one family may pad differently.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from neox_progressive.eval.scoring import block_shape, head_logits, trunk
from neox_progressive.model import Transformer

HEADLINE = "KL(p_small || p_large)"
"""The headline direction (our reading of App. F; the reverse is always reported too)."""
REVERSE = "KL(p_large || p_small)"
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def distribution(values: Sequence[float]) -> dict[str, float]:
    """Median, 90/99/99.9th percentiles (numpy's linear interpolation) and max of per-example values."""
    v = np.asarray(values, dtype=np.float64)
    out = {("median" if q == 50 else f"p{q:g}"): float(np.percentile(v, q)) for q in PERCENTILES}
    out["max"] = float(v.max())
    return out


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64)))


@dataclass
class KLResult:
    """KL between one member pair over examples, App. F averaging, both directions."""

    per_example: list[float]
    """KL(p_small || p_large) of each example: the mean over its positions (the headline direction)."""
    per_example_reverse: list[float] = field(default_factory=list)
    """KL(p_large || p_small) of each example."""
    per_example_top1: list[float] = field(default_factory=list)
    """Share of each example's positions where both members' most likely token is the same."""
    lengths: list[int] = field(default_factory=list)
    """Positions compared in each example."""
    unit: str = "windows"
    """What an example is: `documents` (validation documents, truncated) or `windows` (fixed windows of the stream)."""

    @property
    def kl(self) -> float:
        """Mean over examples of each example's mean over positions: the App. F figure (headline direction)."""
        return _mean(self.per_example)

    @property
    def reverse(self) -> float:
        return _mean(self.per_example_reverse)

    @property
    def top1(self) -> float:
        return _mean(self.per_example_top1)

    @property
    def examples(self) -> int:
        return len(self.per_example)

    @property
    def positions(self) -> int:
        return sum(self.lengths)

    @property
    def token_mean(self) -> float:
        """Flat mean over all positions of all examples (not App. F's averaging; for comparison)."""
        return float(np.dot(self.per_example, self.lengths) / max(1, self.positions))

    def to_dict(self, per_example: bool = True) -> dict:
        out = {"kl": self.kl, "direction": HEADLINE, "examples": self.examples, "positions": self.positions,
               "unit": self.unit, "distribution": distribution(self.per_example), "token_mean": self.token_mean,
               "reverse": {"kl": self.reverse, "direction": REVERSE,
                           "distribution": distribution(self.per_example_reverse)},
               "top1_agreement": self.top1}
        if per_example:
            out["per_example"] = {"kl": self.per_example, "reverse": self.per_example_reverse,
                                  "top1": self.per_example_top1, "positions": self.lengths}
        return out


def kl_from_logits(logits_p: torch.Tensor, logits_q: torch.Tensor, vocab_chunk: int | None = None) -> torch.Tensor:
    """Per-position KL(p || q) from logits [..., V] (float32 math); returns [...].

    With `vocab_chunk`, the vocabulary is processed in slices (two passes), which gives the same
    value as the one-shot computation up to float rounding.
    """
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"logit shapes differ: {tuple(logits_p.shape)} vs {tuple(logits_q.shape)}")
    V = logits_p.shape[-1]
    if vocab_chunk is None or vocab_chunk >= V:
        lp = F.log_softmax(logits_p.float(), dim=-1)
        lq = F.log_softmax(logits_q.float(), dim=-1)
        # kl_div(input=log q, target=log p, log_target) = p * (log p - log q), elementwise
        return F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    lse_p = _chunked_logsumexp(logits_p, vocab_chunk)
    lse_q = _chunked_logsumexp(logits_q, vocab_chunk)
    out = torch.zeros(logits_p.shape[:-1], dtype=torch.float32, device=logits_p.device)
    for s in range(0, V, vocab_chunk):
        lp = logits_p[..., s:s + vocab_chunk].float() - lse_p[..., None]
        lq = logits_q[..., s:s + vocab_chunk].float() - lse_q[..., None]
        out += F.kl_div(lq, lp, reduction="none", log_target=True).sum(-1)
    return out


def _chunked_logsumexp(logits: torch.Tensor, chunk: int) -> torch.Tensor:
    parts = [torch.logsumexp(logits[..., s:s + chunk].float(), dim=-1) for s in range(0, logits.shape[-1], chunk)]
    return torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)


NO_SHIFT = 60.0
"""Rows whose logits all lie within +-NO_SHIFT are exponentiated without subtracting their maximum: exp stays within
float32 range (e^60 x 10^8 terms < 3e38) and nothing that matters underflows, and one pass over the block is saved."""


def _into(buf: torch.Tensor, model: Transformer, hidden: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Float32 logits of vocabulary rows [lo, hi) for hidden rows [n, h], written into buf [n, hi - lo]."""
    w = model.head.weight[lo:hi]
    if w.dtype == torch.float32 and hidden.dtype == torch.float32:
        return torch.matmul(hidden, w.T, out=buf)
    return buf.copy_(hidden @ w.T)


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of x, y [n, c] -> [n]: a batched matrix-vector product, which reads each operand once
    (`torch.linalg.vecdot` materialises x * y first: 2.7x slower on [512, 50304] float32 on CPU)."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(-1)


def argmax_rows(x: torch.Tensor, block: int = 64) -> torch.Tensor:
    """x.argmax(-1) for x [n, V] (the first index of each row's maximum), ~2.4x faster on CPU for a large V.

    PyTorch's CPU argmax is not vectorised while amax is: take the maximum of each block of `block` columns,
    the first block holding the row's maximum, then the first maximum inside that block. Elsewhere (or for a
    small V) it is argmax itself.
    """
    n, V = x.shape
    if x.device.type != "cpu" or V < 64 * block or x.stride(1) != 1:
        return x.argmax(-1)
    full = V - V % block
    blocks = x[:, :full].unflatten(1, (full // block, block))           # a view: rows are contiguous
    maxima = blocks.amax(-1)
    if full < V:
        maxima = torch.cat([maxima, x[:, full:].amax(-1, keepdim=True)], 1)
    first = maxima.argmax(-1)                                          # the first block that holds the maximum
    rows = torch.arange(n, device=x.device)
    inner = first < full // block
    out = torch.empty(n, dtype=torch.long, device=x.device)
    i = rows[inner]
    out[inner] = first[inner] * block + blocks[i, first[inner]].argmax(-1)
    if not bool(inner.all()):
        tail = rows[~inner]
        out[~inner] = full + x[tail, full:].argmax(-1)
    return out


def _exp_rows(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x <- exp(x - shift) in place, shift = the row max m unless every row lies within +-NO_SHIFT (then 0);
    returns the shift per row."""
    if float(m.max()) <= NO_SHIFT and float(m.min()) >= -NO_SHIFT:
        x.exp_()
        return torch.zeros_like(m)
    x.sub_(m[:, None]).exp_()
    return m


def _full_rows(small, large, hs, hl, vocab, bufs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The whole vocabulary in one block: about nine passes over [n, V] per model pair, in buffers reused per block."""
    n = hs.shape[0]
    a, b, d = (t[:n] for t in bufs)
    _into(a, small, hs, 0, vocab)
    _into(b, large, hl, 0, vocab)
    torch.sub(a, b, out=d)                                           # a - b
    ia = argmax_rows(a)                                              # the small member's top token
    ma = a.gather(1, ia[:, None])[:, 0]
    mb = b.amax(-1)
    agree = b.gather(1, ia[:, None])[:, 0] == mb                     # the large member's logit there is its max
    ca, cb = _exp_rows(a, ma), _exp_rows(b, mb)                      # a, b <- exp(a - ca), exp(b - cb)
    sa, sb = a.sum(-1).double(), b.sum(-1).double()
    gap = (ca.double() + sa.log()) - (cb.double() + sb.log())        # log Z_small - log Z_large
    forward = _rowdot(a, d).double() / sa - gap                      # E_p[a - b] - (lse a - lse b)
    reverse = gap - _rowdot(b, d).double() / sb                      # E_q[b - a] + (lse a - lse b)
    return forward.clamp_min(0.0), reverse.clamp_min(0.0), agree


class _Online:
    """Running per-row statistics of one model's logits over vocabulary slices (online log-sum-exp)."""

    def __init__(self, n: int, device):
        self.m = torch.full((n,), -torch.inf, dtype=torch.float32, device=device)   # running max
        self.arg = torch.zeros(n, dtype=torch.long, device=device)                   # its index
        self.s = torch.zeros(n, dtype=torch.float64, device=device)                  # sum exp(x - m)
        self.t = torch.zeros(n, dtype=torch.float64, device=device)                  # sum exp(x - m) * (a - b)

    def update(self, x: torch.Tensor, d: torch.Tensor, lo: int) -> None:
        """Fold in a block x [n, c] of logits (overwritten) whose difference a - b is d [n, c]."""
        bm, barg = x.max(-1)
        self.arg = torch.where(bm > self.m, barg + lo, self.arg)                    # ties keep the first, as argmax
        m = torch.maximum(self.m, bm)
        scale = torch.exp((self.m - m).double())                                   # exp(-inf) = 0 on the first block
        x.sub_(m[:, None]).exp_()
        self.s = self.s * scale + x.sum(-1).double()
        self.t = self.t * scale + _rowdot(x, d).double()
        self.m = m

    def lse(self) -> torch.Tensor:
        return self.m.double() + self.s.log()


def _sliced_rows(small, large, hs, hl, vocab, cols) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vocabulary slices of `cols` (for vocabularies too large for one block): online log-sum-exp, one pass."""
    a_stats, b_stats = _Online(hs.shape[0], hs.device), _Online(hs.shape[0], hs.device)
    for lo in range(0, vocab, cols):
        hi = min(lo + cols, vocab)
        a = head_logits(small, hs, lo, hi).float()                   # (n, c)
        b = head_logits(large, hl, lo, hi).float()
        d = a - b
        a_stats.update(a, d, lo)
        b_stats.update(b, d, lo)
    gap = a_stats.lse() - b_stats.lse()
    forward = a_stats.t / a_stats.s - gap
    reverse = gap - b_stats.t / b_stats.s
    return forward.clamp_min(0.0), reverse.clamp_min(0.0), a_stats.arg == b_stats.arg


@torch.no_grad()
def batch_kl(small: Transformer, large: Transformer, tokens: torch.Tensor, *, vocab_size: int | None = None,
             lengths: Sequence[int] | None = None, position_chunk: int | None = None,
             vocab_chunk: int | None = None) -> tuple[list[float], list[float], list[float], list[int]]:
    """Per-example means over positions for one batch of token ids [B, T]: both KL directions and top-1 agreement.

    Args:
        small, large: the two members (reference models; any widths, the same vocabulary).
        tokens: [B, T] token ids, right-padded; row b is compared on its first `lengths[b]` positions (all if None).
        vocab_size: compare the first `vocab_size` logits only (the tokenizer's real vocabulary).
        position_chunk, vocab_chunk: the block of logits per model that exists at once (default `scoring.block_shape`).

    Returns:
        (KL(p_small || p_large), KL(p_large || p_small), top-1 agreement) per example, and the positions per example.
    """
    B, T = tokens.shape
    lens = [T] * B if lengths is None else [int(n) for n in lengths]
    if len(lens) != B or any(n < 1 or n > T for n in lens):
        raise ValueError(f"lengths {lens} do not fit a batch of shape {tuple(tokens.shape)}")
    vocab = vocab_size or min(small.head.weight.shape[0], large.head.weight.shape[0])
    rows, cols = block_shape(vocab, position_chunk, vocab_chunk, tokens.device)
    keep = (torch.arange(T, device=tokens.device)[None, :] < torch.tensor(lens, device=tokens.device)[:, None]).reshape(-1)
    hs = trunk(small, tokens).reshape(B * T, -1)[keep]              # (N, h_small): the examples' positions only
    hl = trunk(large, tokens).reshape(B * T, -1)[keep]              # (N, h_large)
    N = hs.shape[0]
    fwd = torch.empty(N, dtype=torch.float64, device=tokens.device)
    rev = torch.empty_like(fwd)
    top = torch.empty(N, dtype=torch.bool, device=tokens.device)
    full = cols >= vocab
    bufs = [torch.empty(min(rows, N), vocab, dtype=torch.float32, device=tokens.device) for _ in range(3)] if full else None
    for s in range(0, N, rows):
        part = (small, large, hs[s:s + rows], hl[s:s + rows], vocab)
        fwd[s:s + rows], rev[s:s + rows], top[s:s + rows] = _full_rows(*part, bufs) if full else _sliced_rows(*part, cols)
    bounds = np.cumsum([0] + lens)
    f, r, t = fwd.cpu().numpy(), rev.cpu().numpy(), top.cpu().numpy()
    per = [(float(f[a:b].mean()), float(r[a:b].mean()), float(t[a:b].mean())) for a, b in zip(bounds[:-1], bounds[1:])]
    return [x[0] for x in per], [x[1] for x in per], [x[2] for x in per], lens


def pair_kl(small: Transformer, large: Transformer, batches: Iterable[torch.Tensor | tuple[torch.Tensor, Sequence[int]]],
            *, vocab_size: int | None = None, position_chunk: int | None = None, vocab_chunk: int | None = None,
            unit: str = "windows", progress=None) -> KLResult:
    """App. F KL over examples: each batch is [B, T] token ids (one example per row), or ([B, T], lengths)
    for right-padded examples of different lengths (see `examples_kl`)."""
    res = KLResult(per_example=[], unit=unit)
    for batch in batches:
        tokens, lengths = batch if isinstance(batch, tuple) else (batch, None)
        f, r, t, n = batch_kl(small, large, tokens, vocab_size=vocab_size, lengths=lengths,
                              position_chunk=position_chunk, vocab_chunk=vocab_chunk)
        res.per_example += f
        res.per_example_reverse += r
        res.per_example_top1 += t
        res.lengths += n
        if progress:
            progress(len(f))
    if not res.per_example:
        raise ValueError("no examples to compare")
    return res


def examples_kl(small: Transformer, large: Transformer, examples: Sequence[Sequence[int] | np.ndarray], *,
                batch_size: int = 4, vocab_size: int | None = None, position_chunk: int | None = None,
                vocab_chunk: int | None = None, unit: str = "documents", progress=None) -> KLResult:
    """App. F KL over token sequences of any lengths (each one example, compared at all its positions).

    Examples are batched longest first (little padding); the per-example values come back in the given order.
    """
    device = small.head.weight.device
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))

    def batches():
        for s in range(0, len(order), batch_size):
            group = [np.asarray(examples[i], dtype=np.int64) for i in order[s:s + batch_size]]
            lens = [len(g) for g in group]
            x = np.zeros((len(group), max(lens)), dtype=np.int64)
            for row, g in enumerate(group):
                x[row, :len(g)] = g
            yield torch.as_tensor(x, device=device), lens

    got = pair_kl(small, large, batches(), vocab_size=vocab_size, position_chunk=position_chunk,
                  vocab_chunk=vocab_chunk, unit=unit, progress=progress)
    back = np.argsort(order)
    return KLResult(per_example=[got.per_example[i] for i in back],
                    per_example_reverse=[got.per_example_reverse[i] for i in back],
                    per_example_top1=[got.per_example_top1[i] for i in back],
                    lengths=[got.lengths[i] for i in back], unit=unit)
