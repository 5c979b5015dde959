"""The held-out examples every metric uses, cut once from the validation data.

- Perplexity: NeoX's validation samples, windows of seq_length + 1 tokens of the concatenated
  document stream in file order (`perplexity.token_windows`), as NeoX's `lm_loss_ppl` is computed.
- KL (paper Section 5.2, App. F: "10,000 examples from the FineWeb-Edu validation dataset"): by
  default validation *documents*, sampled with `seed` (without replacement). Our reading of an
  example: the end-of-document token that precedes every document in NeoX's training stream,
  then the document's tokens, truncated to seq_length tokens; the KL is compared at every one of
  its positions, i.e. on the predictions of the document's tokens and of its end. So examples
  have different lengths and never cross a document boundary. `kl_on: windows` keeps the older
  mode (the first windows of the stream, which cross document boundaries).
- Speculative decoding (Section 5.3: "1,000 prompts sampled from the FineWeb-Edu validation
  dataset"): the first `prompt_tokens` tokens of documents (as above, end-of-document token
  first) sampled with `seed`, among the documents that are at least that long.

A document is what NeoX's index groups as one (`doc_idx`) for a NeoX dataset, or one line of a
.jsonl file (a plain text file is one document). Without a tokenizer that names an
end-of-document id, examples are the documents as stored (no token in front).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from neox_progressive.errors import UserError
from neox_progressive.eval.perplexity import token_windows

KL_UNITS = ("documents", "windows")


class Documents:
    """Documents of held-out data by index, read (and tokenized) only when asked for."""

    def __init__(self, count: int, get: Callable[[int], np.ndarray], source: str):
        self._count, self._get, self.source = count, get, source
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> np.ndarray:
        if i not in self._cache:
            self._cache[i] = np.asarray(self._get(i), dtype=np.int64)
        return self._cache[i]

    def in_order(self):
        return (self[i] for i in range(len(self)))

    @classmethod
    def from_mmap(cls, prefix: str | Path) -> Documents:
        prefix = str(prefix).removesuffix(".bin").removesuffix(".idx")
        if not Path(prefix + ".bin").is_file() or not Path(prefix + ".idx").is_file():
            raise UserError(f"NeoX dataset {prefix!r} not found: expected {prefix}.bin and {prefix}.idx "
                            "(the prefix NeoX's data_path / valid_data_paths names, without the extension)")
        try:
            from neox_progressive.data import MMapDataset
        except ImportError:
            raise UserError("reading NeoX .bin/.idx data needs neox_progressive.data, which this installation lacks; "
                            "pass the held-out text with --text instead, or update neox-progressive") from None
        ds = MMapDataset(prefix)
        bounds = [int(x) for x in ds.doc_idx]
        return cls(len(bounds) - 1, lambda i: ds.tokens(bounds[i], bounds[i + 1]), prefix)

    @classmethod
    def from_text(cls, path: str | Path, encode, eod: int | None = None) -> Documents:
        """Lines of a .jsonl (`text` key) or a whole plain text file, each followed by `eod` when given."""
        import json

        path = Path(path)
        if not path.is_file():
            raise UserError(f"text file {str(path)!r} does not exist")
        tail = [] if eod is None else [eod]
        if path.suffix != ".jsonl":
            return cls(1, lambda i: encode(path.read_text(encoding="utf-8")) + tail, str(path))
        lines = [(n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]

        def get(i: int) -> list[int]:
            n, line = lines[i]
            try:
                return encode(json.loads(line)["text"]) + tail
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{n}: expected a JSON object with a 'text' string") from None

        return cls(len(lines), get, str(path))


def document_example(doc: np.ndarray, eod: int | None, length: int) -> np.ndarray:
    """[eod] + the document without its own trailing eod, truncated to `length` tokens (the document as
    stored, truncated, when `eod` is None)."""
    if eod is None:
        return doc[:length]
    body = doc[:-1] if len(doc) and doc[-1] == eod else doc
    return np.concatenate([np.array([eod], dtype=np.int64), body[:length - 1]])


@dataclass
class HeldOut:
    """Everything cut from the held-out data for one evaluation."""

    seq_length: int
    windows: list[np.ndarray] = field(default_factory=list)
    """NeoX samples of seq_length + 1 tokens, file order (perplexity; KL with kl_on=windows)."""
    kl_examples: list[np.ndarray] = field(default_factory=list)
    """KL examples (token ids; every position is compared)."""
    kl_source: list[int] = field(default_factory=list)
    """Index of each KL example's document (or window)."""
    prompts: list[list[int]] = field(default_factory=list)
    prompt_source: list[int] = field(default_factory=list)
    """Index of each prompt's document."""
    documents: int = 0
    """Documents in the held-out data."""
    eod: int | None = None


def _need_more(what: str, have: int, need: int, src: str, fix: str) -> UserError:
    return UserError(f"{src} holds {have} {what} but {need} are needed; {fix}")


def cut_windows(docs: Documents, seq: int, need: int, fix: str) -> list[np.ndarray]:
    windows = list(token_windows(docs.in_order(), seq + 1, need)) if need else []
    if len(windows) < need:
        raise _need_more(f"windows of {seq + 1} tokens", len(windows), need, docs.source, fix)
    return windows


def sample_examples(docs: Documents, order: Sequence[int], n: int, eod: int | None, seq: int,
                    min_tokens: int = 1) -> tuple[list[np.ndarray], list[int]]:
    """The first `n` documents in `order` whose example has at least `min_tokens` tokens."""
    out, src = [], []
    for i in order:
        if len(out) == n:
            break
        ex = document_example(docs[int(i)], eod, seq)
        if len(ex) >= min_tokens:
            out.append(ex)
            src.append(int(i))
    return out, src


def held_out(docs: Documents, seq: int, *, ppl: int, kl: int, kl_on: str, prompts: int, prompt_tokens: int,
             seed: int, eod: int | None) -> HeldOut:
    """Cut the perplexity windows, KL examples and prompts (counts of 0 skip a metric)."""
    if kl_on not in KL_UNITS:
        raise UserError(f"kl_on {kl_on!r}: expected one of {', '.join(KL_UNITS)}")
    windows = cut_windows(docs, seq, max(ppl, kl if kl_on == "windows" else 0),
                          "use more data, a smaller --seq-length, or fewer --ppl-windows/--kl-examples")
    out = HeldOut(seq_length=seq, windows=windows, documents=len(docs), eod=eod)
    order = np.random.default_rng(seed).permutation(len(docs)) if (kl and kl_on == "documents") or prompts else []
    if kl and kl_on == "windows":
        out.kl_examples, out.kl_source = [w[:-1] for w in windows[:kl]], list(range(kl))
    elif kl:
        out.kl_examples, out.kl_source = sample_examples(docs, order, kl, eod, seq, min_tokens=2)
        if len(out.kl_examples) < kl:
            raise _need_more("documents of 2 tokens or more", len(out.kl_examples), kl, docs.source,
                             "use more data, fewer --kl-examples, or --kl-on windows")
    if prompts:
        if prompt_tokens > seq:
            raise UserError(f"--prompt-tokens {prompt_tokens} is longer than the sequence length {seq}")
        out.prompts, out.prompt_source = sample_examples(docs, order, prompts, eod, seq, min_tokens=prompt_tokens)
        out.prompts = [p[:prompt_tokens].tolist() for p in out.prompts]
        if len(out.prompts) < prompts:
            raise _need_more(f"documents of {prompt_tokens} tokens or more", len(out.prompts), prompts, docs.source,
                             "use more data, fewer --prompts, or a smaller --prompt-tokens")
    return out
