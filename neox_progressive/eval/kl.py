"""KL divergence between the next-token distributions of two family members (paper App. F).

Yano et al. 2025, Section 5.2 and Appendix F: at every token position t of an example x, with
p_S the distribution of the *smaller* member and p_L that of the *larger* one over the vocabulary V,

    KL_t = KL(p_S || p_L) = sum_{v in V} p_S(v | x_<=t) * (log p_S(v | x_<=t) - log p_L(v | x_<=t)),

then the mean of KL_t over the positions of the example, then the mean over the examples. The
direction is the paper's: the smaller (earlier, "draft") member is the first argument, the
reference distribution is the larger one. KL is not symmetric, so the order matters.

Memory: neither model's logits are ever held for a whole batch. Each model runs its trunk
(embedding, layers, final norm) once, giving hidden states [B, T, h]; the output head is then
applied `position_chunk` positions at a time, so at most [position_chunk, V] logits per model
exist at once (default: a 64 MB float32 block on CPU, 256 MB on GPU; `scoring.chunk_rows`). With `vocab_chunk` the
vocabulary is also split: a first pass accumulates each model's log-normaliser chunk by chunk
(log-sum-exp), a second pass sums the KL terms, so only [position_chunk, vocab_chunk] blocks exist.

Only the tokenizer's real vocabulary is compared (`vocab_size`): the rows NeoX pads the embedding
and head with (`make_vocab_size_divisible_by` x TP) can never be a real token, and two members of
one family may pad differently.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from neox_progressive.eval.scoring import chunk_rows, head_logits, trunk
from neox_progressive.model import Transformer


@dataclass
class KLResult:
    """KL(p_small || p_large) of one member pair, App. F averaging."""

    kl: float
    """Mean over examples of (mean over positions of the per-position KL)."""
    per_example: list[float] = field(default_factory=list)
    positions: int = 0
    """Token positions compared, all examples together."""

    @property
    def examples(self) -> int:
        return len(self.per_example)

    def to_dict(self) -> dict:
        return {"kl": self.kl, "examples": self.examples, "positions": self.positions,
                "direction": "KL(p_small || p_large)"}


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


def _kl_rows(small: Transformer, large: Transformer, hs: torch.Tensor, hl: torch.Tensor, vocab: int,
             vocab_chunk: int | None) -> torch.Tensor:
    """Per-row KL(p_small || p_large) for hidden rows hs [n, h_small], hl [n, h_large]."""
    if vocab_chunk is None or vocab_chunk >= vocab:
        # three [n, V] blocks at most: log p, then log q, then in place (log p - log q) and p
        lp = F.log_softmax(head_logits(small, hs, 0, vocab).float(), dim=-1)
        lq = F.log_softmax(head_logits(large, hl, 0, vocab).float(), dim=-1)
        lq.sub_(lp).neg_()                                           # log p - log q
        return torch.einsum("nv,nv->n", lp.exp_(), lq)              # sum_v p (log p - log q)
    chunks = [(s, min(s + vocab_chunk, vocab)) for s in range(0, vocab, vocab_chunk)]
    lse_s = torch.logsumexp(torch.stack([torch.logsumexp(head_logits(small, hs, a, b).float(), -1) for a, b in chunks], -1), -1)
    lse_l = torch.logsumexp(torch.stack([torch.logsumexp(head_logits(large, hl, a, b).float(), -1) for a, b in chunks], -1), -1)
    out = torch.zeros(hs.shape[0], dtype=torch.float32, device=hs.device)
    for a, b in chunks:
        ls = head_logits(small, hs, a, b).float() - lse_s[:, None]
        ll = head_logits(large, hl, a, b).float() - lse_l[:, None]
        out += F.kl_div(ll, ls, reduction="none", log_target=True).sum(-1)
    return out


@torch.no_grad()
def batch_kl(small: Transformer, large: Transformer, tokens: torch.Tensor, *, vocab_size: int | None = None,
             lengths: list[int] | None = None, position_chunk: int | None = None,
             vocab_chunk: int | None = None) -> tuple[list[float], int]:
    """Per-example mean over positions of KL(p_small || p_large) for one batch of token ids [B, T].

    Args:
        small, large: the two members (reference models; any widths, the same vocabulary).
        tokens: [B, T] token ids; row b is compared on its first `lengths[b]` positions (all if None).
        vocab_size: compare the first `vocab_size` logits only (the tokenizer's real vocabulary).
        position_chunk: positions whose logits exist at once, per model (default: `scoring.chunk_rows`).
        vocab_chunk: vocabulary slice size (None: the whole vocabulary at once).

    Returns:
        (per-example mean KL, positions compared).
    """
    B, T = tokens.shape
    vocab = vocab_size or min(small.head.weight.shape[0], large.head.weight.shape[0])
    chunk = chunk_rows(vocab, position_chunk, tokens.device)
    hs = trunk(small, tokens).reshape(B * T, -1)                    # (B*T, h_small)
    hl = trunk(large, tokens).reshape(B * T, -1)                    # (B*T, h_large)
    rows = torch.empty(B * T, dtype=torch.float32, device=tokens.device)
    for s in range(0, B * T, chunk):
        rows[s:s + chunk] = _kl_rows(small, large, hs[s:s + chunk], hl[s:s + chunk], vocab, vocab_chunk)
    rows = rows.view(B, T)
    lens = lengths or [T] * B
    return [float(rows[b, :n].double().mean()) for b, n in enumerate(lens)], sum(lens)


def pair_kl(small: Transformer, large: Transformer, batches: Iterable[torch.Tensor], *, vocab_size: int | None = None,
            position_chunk: int | None = None, vocab_chunk: int | None = None, progress=None) -> KLResult:
    """App. F KL(p_small || p_large) over examples: each batch is [B, T] token ids (one example per row).

    The result is the mean over all examples of each example's mean over its positions.
    """
    per_example: list[float] = []
    positions = 0
    for tokens in batches:
        vals, n = batch_kl(small, large, tokens, vocab_size=vocab_size, position_chunk=position_chunk,
                           vocab_chunk=vocab_chunk)
        per_example += vals
        positions += n
        if progress:
            progress(len(vals))
    if not per_example:
        raise ValueError("no examples to compare")
    return KLResult(kl=sum(per_example) / len(per_example), per_example=per_example, positions=positions)
