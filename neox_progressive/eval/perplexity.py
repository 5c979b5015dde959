"""Validation perplexity on held-out data in NeoX's format, and the token windows it (and KL in window mode) uses.

NeoX's validation loss (megatron/training.py `evaluate`) is the mean next-token cross entropy
over `eval_iters` batches of samples of `seq_length + 1` tokens, cut from the documents of the
validation set concatenated in order (megatron/data/gpt2_dataset.py: sample i covers tokens
[i*seq_length, (i+1)*seq_length] of the stream, so consecutive samples share one token), with
the softmax over the whole padded vocabulary; `lm_loss_ppl` = exp(loss). Here the samples are
taken in file order, without NeoX's shuffle, so every member and every run sees the same ones.

Data: a NeoX mmap dataset prefix (`<prefix>.bin` / `<prefix>.idx`, read with
`neox_progressive.data.MMapDataset`), or any iterable of token-id documents.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neox_progressive.errors import UserError
from neox_progressive.eval.scoring import target_logprobs
from neox_progressive.model import Transformer


def token_windows(documents: Iterable[Sequence[int] | np.ndarray], length: int, limit: int | None = None) -> Iterator[np.ndarray]:
    """NeoX samples from documents: windows of `length` tokens (= seq_length + 1) with stride length - 1."""
    if length < 2:
        raise UserError(f"a window needs at least 2 tokens (seq_length >= 1), got {length}")
    buf = np.zeros(0, dtype=np.int64)
    made = 0
    for doc in documents:
        buf = np.concatenate([buf, np.asarray(doc, dtype=np.int64)])
        while len(buf) >= length:
            if limit is not None and made >= limit:
                return
            yield buf[:length].copy()
            made += 1
            buf = buf[length - 1:]
    # a partial last window is dropped, as NeoX drops the tail of its stream


def mmap_documents(prefix: str | Path) -> Iterator[np.ndarray]:
    """The items of a NeoX mmap dataset in file order."""
    prefix = str(prefix).removesuffix(".bin").removesuffix(".idx")
    if not Path(prefix + ".bin").is_file() or not Path(prefix + ".idx").is_file():
        raise UserError(f"NeoX dataset {prefix!r} not found: expected {prefix}.bin and {prefix}.idx "
                        "(the prefix NeoX's data_path / valid_data_paths names, without the extension)")
    from neox_progressive.data import MMapDataset

    ds = MMapDataset(prefix)
    for i in range(len(ds)):
        yield np.asarray(ds[i])


@dataclass
class PerplexityResult:
    loss: float
    """Mean next-token cross entropy (nats) over all predicted tokens."""
    tokens: int
    windows: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    def to_dict(self) -> dict:
        return {"loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens, "windows": self.windows}


@torch.no_grad()
def perplexity(model: Transformer, windows: Iterable[np.ndarray], *, batch_size: int = 4,
               position_chunk: int | None = None, progress=None) -> PerplexityResult:
    """Cross entropy of `model` on windows of seq_length + 1 tokens (inputs = all but the last)."""
    device = model.head.weight.device
    total, tokens, count = 0.0, 0, 0
    batch: list[np.ndarray] = []

    def flush():
        nonlocal total, tokens, count
        x = torch.as_tensor(np.stack(batch), device=device)
        if int(x.max()) >= model.head.weight.shape[0]:
            raise UserError(f"the data has token id {int(x.max())} but the model's vocabulary has "
                            f"{model.head.weight.shape[0]} rows; the data was tokenized with another tokenizer")
        logp, _ = target_logprobs(model, x[:, :-1], x[:, 1:], chunk=position_chunk)
        total += -float(logp.double().sum())
        tokens += logp.numel()
        count += len(batch)
        if progress:
            progress(len(batch))
        batch.clear()

    for w in windows:
        if batch and len(w) != len(batch[0]):
            flush()
        batch.append(w)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not tokens:
        raise UserError("no evaluation windows: the data is shorter than one sequence (seq_length + 1 tokens)")
    return PerplexityResult(loss=total / tokens, tokens=tokens, windows=count)
