"""The tokenizer a NeoX config names, for evaluation: encode, decode and an end-of-text id.

Follows megatron/tokenizer/tokenizer.py (`build_tokenizer`) for `tokenizer_type`:

- `HFTokenizer`: `vocab_file` is a `tokenizer.json`, read with `tokenizers` (ids = `encode(text).ids`).
- `SPMTokenizer`: `vocab_file` is a SentencePiece `.model` (ids = `encode(text)`).
- `GPT2BPETokenizer`: `vocab_file` = vocab.json and `merge_file` = merges.txt; byte-level BPE
  with the GPT-2 split pattern, built here with `tokenizers` (NeoX uses its own copy of
  OpenAI's encoder, which gives the same ids).
- `CharLevelTokenizer`: UTF-8 bytes, vocabulary 512.

End of text: NeoX uses the id of `<|endoftext|>`, which Llama-style tokenizers do not have
(HFTokenizer then gives None, SPMTokenizer silently the unknown id). Here the first of
`EOT_CANDIDATES` that the vocabulary really contains is used, so `</s>` for Llama's
SentencePiece and HF tokenizers. Nothing is downloaded: a missing file is a `UserError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neox_progressive.errors import UserError

EOT_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
TYPES = ("HFTokenizer", "SPMTokenizer", "GPT2BPETokenizer", "CharLevelTokenizer")


@dataclass
class Tokenizer:
    """A loaded tokenizer: `encode(text) -> ids`, `decode(ids) -> text`, `eot_id`, `vocab_size`."""

    kind: str
    path: str | None
    vocab_size: int
    eot_id: int | None
    _encode: Any = field(repr=False)
    _decode: Any = field(repr=False)

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids: list[int]) -> str:
        return self._decode(list(ids))

    def identity(self) -> str:
        """What makes two tokenizers the same: kind, vocabulary size and file contents."""
        import hashlib

        digest = hashlib.sha256(Path(self.path).read_bytes()).hexdigest()[:16] if self.path else "-"
        return f"{self.kind}:{self.vocab_size}:{digest}"


def _resolve(path: str | None, base_dir: Path | None, key: str, ttype: str) -> Path:
    if not path:
        raise UserError(f"config key {key} is not set; {ttype} needs it (the tokenizer file the member was trained with)")
    p = Path(path)
    if not p.is_absolute() and not p.exists() and base_dir is not None and (base_dir / p).exists():
        p = base_dir / p
    if not p.is_file():
        raise UserError(f"tokenizer file {path!r} (config key {key}, {ttype}) does not exist on this machine; "
                        "copy it here and point the config at it (nothing is downloaded)")
    return p


def _hf(path: Path) -> Tokenizer:
    try:
        from tokenizers import Tokenizer as HFTok
    except ImportError:
        raise UserError("HFTokenizer needs the `tokenizers` package: pip install tokenizers") from None
    tok = HFTok.from_file(str(path))
    vocab = tok.get_vocab(with_added_tokens=True)
    eot = next((vocab[c] for c in EOT_CANDIDATES if c in vocab), None)
    return Tokenizer("HFTokenizer", str(path), tok.get_vocab_size(), eot, lambda s: tok.encode(s).ids,
                     lambda ids: tok.decode(ids, skip_special_tokens=False))


def _spm(path: Path) -> Tokenizer:
    try:
        import sentencepiece as spm
    except ImportError:
        raise UserError("SPMTokenizer needs the `sentencepiece` package: pip install sentencepiece") from None
    sp = spm.SentencePieceProcessor(model_file=str(path))
    eot = None
    for cand in EOT_CANDIDATES:
        i = sp.piece_to_id(cand)
        if sp.id_to_piece(i) == cand and i != sp.unk_id():
            eot = int(i)
            break
    if eot is None and sp.eos_id() >= 0:
        eot = int(sp.eos_id())
    return Tokenizer("SPMTokenizer", str(path), int(sp.get_piece_size()), eot, sp.encode, sp.decode)


def _gpt2(vocab: Path, merges: Path) -> Tokenizer:
    try:
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers
    except ImportError:
        raise UserError("GPT2BPETokenizer needs the `tokenizers` package: pip install tokenizers") from None
    tok = HFTok(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    table = tok.get_vocab()
    return Tokenizer("GPT2BPETokenizer", str(vocab), len(table), table.get("<|endoftext|>"),
                     lambda s: tok.encode(s).ids, lambda ids: tok.decode(ids, skip_special_tokens=False))


def _charlevel() -> Tokenizer:
    return Tokenizer("CharLevelTokenizer", None, 512, 0, lambda s: list(s.encode("utf-8")),
                     lambda ids: "".join(chr(max(32, min(i, 512))) for i in ids))


def load_tokenizer(cfg: dict[str, Any], base_dir: Path | None = None) -> Tokenizer:
    """The tokenizer of a merged NeoX config (`tokenizer_type`, `vocab_file`, `merge_file`)."""
    ttype = str(cfg.get("tokenizer_type") or "GPT2BPETokenizer")
    kind = next((t for t in TYPES if t.lower() == ttype.lower()), None)
    if kind is None:
        raise UserError(f"tokenizer_type {ttype!r} is not supported for evaluation; expected one of {', '.join(TYPES)}")
    if kind == "CharLevelTokenizer":
        return _charlevel()
    vocab = _resolve(cfg.get("vocab_file"), base_dir, "vocab_file", kind)
    if kind == "HFTokenizer":
        return _hf(vocab)
    if kind == "SPMTokenizer":
        return _spm(vocab)
    return _gpt2(vocab, _resolve(cfg.get("merge_file"), base_dir, "merge_file", kind))
