"""Speculative decoding with a smaller family member drafting for a larger one (paper Section 5.3).

Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via Speculative Decoding"
(ICML), Algorithm 1. Each round the draft model proposes `draft_len` tokens autoregressively
(the paper's Table 5 uses 8); the target scores all of them in one forward pass and keeps a
prefix; one more token comes from the target, so a round yields between 1 and draft_len + 1 tokens.

- Greedy (temperature 0): draft token d_i is kept while it equals the target's argmax at that
  position; the target's argmax follows the kept prefix. The output is exactly the target's own
  greedy output.
- Sampled (temperature > 0): d_i ~ q_i is kept with probability min(1, p_i(d_i) / q_i(d_i)); at the
  first rejection the replacement is drawn from norm(max(0, p_i - q_i)); if all are kept a bonus
  token is drawn from p_{k+1}. The output is distributed exactly as sampling from the target.

Both models keep a KV cache (`model.KVCache`); a rejected suffix is dropped with `crop`. The
acceptance rate is accepted draft tokens / proposed draft tokens over all rounds (the paper's
"percentage of draft tokens accepted"). Like transformers' assisted generation, a round near the
end proposes min(draft_len, tokens still allowed - 1) tokens, so that a round never overshoots.
Batch size 1, as in the paper's timing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from neox_progressive.model import KVCache, Transformer

DEFAULT_DRAFT_LEN = 8


@dataclass
class Generation:
    """What one generation call produced, and what it cost."""

    tokens: list[int]
    """The new tokens (prompt excluded)."""
    seconds: float
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    """Target forward passes after the prompt (verification rounds)."""

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model: Transformer, cache: list[KVCache], tokens: list[int], device, vocab: int) -> torch.Tensor:
    """Feed `tokens` after what the cache holds; float32 logits [len(tokens), vocab]."""
    x = torch.tensor([tokens], dtype=torch.long, device=device)
    return model(x, cache)[0, :, :vocab].float()


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(logits / temperature, dim=-1)


def _sample(probs: torch.Tensor, generator) -> int:
    """One draw from a probability vector (every random token choice goes through here)."""
    return int(torch.multinomial(probs, 1, generator=generator))


def _accept(p_x: float, q_x: float, generator, device) -> bool:
    """Keep a draft token x ~ q with probability min(1, p(x) / q(x)) (the only other random draw)."""
    r = float(torch.rand((), generator=generator, device=device))
    return r * q_x < p_x  # r < p/q without dividing by a zero q


def _pick(logits: torch.Tensor, temperature: float, generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    return _sample(_probs(logits, temperature), generator)


def _vocab(model: Transformer, vocab_size: int | None) -> int:
    return vocab_size or model.head.weight.shape[0]


@torch.no_grad()
def target_generate(target: Transformer, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
                    generator: torch.Generator | None = None, eos_id: int | None = None,
                    vocab_size: int | None = None) -> Generation:
    """Plain autoregressive decoding with a KV cache: the baseline for speculative decoding."""
    device = target.head.weight.device
    vocab = _vocab(target, vocab_size)
    _sync(device)
    start = time.perf_counter()
    cache = target.new_cache()
    logits = _step(target, cache, list(prompt), device, vocab)[-1]
    out: list[int] = []
    while len(out) < max_new_tokens:
        tok = _pick(logits, temperature, generator)
        out.append(tok)
        if tok == eos_id or len(out) == max_new_tokens:
            break
        logits = _step(target, cache, [tok], device, vocab)[-1]
    _sync(device)
    return Generation(out, time.perf_counter() - start, rounds=len(out))


def verify(draft_tokens: list[int], p: torch.Tensor, q: torch.Tensor | None, temperature: float,
           generator: torch.Generator | None = None) -> tuple[int, int]:
    """One verification: how many draft tokens are kept, and the token that follows them.

    Args:
        draft_tokens: the k proposed tokens.
        p: target logits [k + 1, V] at the positions predicting d_1..d_k and the bonus token.
        q: draft logits [k, V] that d_1..d_k were drawn from (sampled mode only).
        temperature: 0 for greedy, else the sampling temperature of both models.

    Returns:
        (n kept, next token): the round emits d_1..d_n followed by the next token.
    """
    k = len(draft_tokens)
    if temperature == 0:
        best = p.argmax(-1).tolist()
        n = 0
        while n < k and draft_tokens[n] == best[n]:
            n += 1
        return n, best[n]
    pp = _probs(p, temperature)
    if k == 0:
        return 0, _sample(pp[0], generator)
    qq = _probs(q, temperature)
    for i, d in enumerate(draft_tokens):
        if _accept(float(pp[i, d]), float(qq[i, d]), generator, p.device):
            continue
        residual = torch.clamp(pp[i] - qq[i], min=0)
        if float(residual.sum()) <= 0:  # p == q up to rounding: any p sample is exact
            residual = pp[i]
        return i, _sample(residual / residual.sum(), generator)
    return k, _sample(pp[k], generator)  # all k kept: the bonus token, from the target at position k + 1


@torch.no_grad()
def speculative_generate(draft: Transformer, target: Transformer, prompt: Sequence[int], max_new_tokens: int, *,
                         draft_len: int = DEFAULT_DRAFT_LEN, temperature: float = 0.0,
                         generator: torch.Generator | None = None, eos_id: int | None = None,
                         vocab_size: int | None = None) -> Generation:
    """Generate `max_new_tokens` from `target`, drafting with `draft` (Leviathan et al. 2023, Alg. 1).

    Both models must share the tokenizer; `vocab_size` limits both to the real vocabulary (the
    padded rows are never proposed or sampled).
    """
    if draft_len < 1:
        raise ValueError(f"draft_len must be >= 1, got {draft_len}")
    device = target.head.weight.device
    vocab = _vocab(target, vocab_size)
    _sync(device)
    start = time.perf_counter()
    seq = list(prompt)
    n_prompt = len(seq)
    tcache, dcache = target.new_cache(), draft.new_cache()
    if n_prompt > 1:  # both caches hold everything but the last token, which is fed with the drafts
        _step(target, tcache, seq[:-1], device, vocab)
        _step(draft, dcache, seq[:-1], device, vocab)
    res = Generation([], 0.0)
    while len(seq) - n_prompt < max_new_tokens:
        k = min(draft_len, max_new_tokens - (len(seq) - n_prompt) - 1)
        proposed: list[int] = []
        qs = []
        for _ in range(k):
            pending = (seq + proposed)[len(dcache[0]):]
            logits = _step(draft, dcache, pending, device, vocab)[-1]
            qs.append(logits)
            proposed.append(_pick(logits, temperature, generator))
        fed = seq[len(tcache[0]):] + proposed
        p = _step(target, tcache, fed, device, vocab)[-(k + 1):]
        n, nxt = verify(proposed, p, torch.stack(qs) if qs else None, temperature, generator)
        new = proposed[:n] + [nxt]
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id) + 1]
        res.drafted += k
        res.accepted += min(n, len(new) - 1)  # a draft token after an EOS is not used
        res.rounds += 1
        seq += new
        for cache in (tcache, dcache):  # drop what was computed for rejected drafts
            for layer in cache:
                layer.crop(min(len(layer), len(seq) - 1))
        if eos_id is not None and seq[-1] == eos_id:
            break
    _sync(device)
    res.seconds = time.perf_counter() - start
    res.tokens = seq[n_prompt:]
    return res
