"""Forward passes for evaluation that never hold a whole batch of logits.

`trunk` runs the reference model without its output head: hidden states [B, T, h] after the
final norm. Callers apply the head to a few positions at a time (`head_logits`), so a 50k
vocabulary and long sequences fit: [chunk, V] logits exist at once instead of [B, T, V].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from neox_progressive.model import Transformer

CHUNK_BYTES = {"cpu": 64 << 20}
"""Default size of one [positions, vocab] float32 logits block: 64 MB on CPU (333 positions
of a 50k vocabulary), 256 MB on accelerators (large matmuls; 1333 positions of a 50k vocabulary)."""


def chunk_rows(vocab: int, chunk: int | None = None, device: torch.device | str = "cpu") -> int:
    """Positions per head application: `chunk` if given, else what fits in CHUNK_BYTES (at least 16)."""
    budget = CHUNK_BYTES.get(torch.device(device).type, 256 << 20)
    return chunk if chunk else max(16, budget // (4 * vocab))


def block_shape(vocab: int, rows: int | None = None, cols: int | None = None,
                device: torch.device | str = "cpu") -> tuple[int, int]:
    """(rows, vocabulary columns) of one KL logits block: `rows` or what fits in CHUNK_BYTES, `cols` or the whole
    vocabulary."""
    cols = min(vocab, cols or vocab)
    return chunk_rows(cols, rows, device), cols


def trunk(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """Hidden states after the final norm, [B, T, h]: the model's forward pass without the head."""
    return model.hidden(tokens)


def head_logits(model: Transformer, hidden: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Logits of vocabulary rows [lo, hi) for hidden rows [n, h] -> [n, hi - lo] (the model's dtype)."""
    w = model.head.weight[lo:hi]                                     # (v, h)
    return hidden @ w.T                                              # (n, v)


@torch.no_grad()
def target_logprobs(model: Transformer, tokens: torch.Tensor, targets: torch.Tensor,
                    chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(targets[b, t] | tokens[b, :t+1]) and whether it is the argmax, both [B, T].

    The softmax runs over the whole (padded) vocabulary, as NeoX's training loss and its eval
    adapter do.
    """
    B, T = tokens.shape
    chunk = chunk_rows(model.head.weight.shape[0], chunk, tokens.device)
    hidden = trunk(model, tokens).reshape(B * T, -1)
    flat = targets.reshape(B * T)
    logp = torch.empty(B * T, dtype=torch.float32, device=tokens.device)
    greedy = torch.empty(B * T, dtype=torch.bool, device=tokens.device)
    for s in range(0, B * T, chunk):
        lp = F.log_softmax(head_logits(model, hidden[s:s + chunk]).float(), dim=-1)   # (n, V)
        tgt = flat[s:s + chunk]
        logp[s:s + chunk] = lp.gather(1, tgt[:, None])[:, 0]
        greedy[s:s + chunk] = lp.argmax(-1) == tgt
    return logp.view(B, T), greedy.view(B, T)
