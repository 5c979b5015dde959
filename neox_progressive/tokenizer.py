"""The tokenizer of a NeoX config or a tokenizer file: ids, vocabulary size and EOD id.

One implementation for every verb: the model shape (padded vocabulary), prepare-data (the EOD
appended to each document), evaluation (the end-of-text id of lm-eval and of document examples)
and export-hf (eos/bos). Follows megatron/tokenizer/tokenizer.py (`build_tokenizer`):

- `HFTokenizer`: `vocab_file` is a `tokenizer.json` (ids = `tokenizers.Tokenizer.encode(text).ids`,
  post-processor specials included, as NeoX).
- `SPMTokenizer`: `vocab_file` is a SentencePiece `.model` (ids = `SentencePieceProcessor.encode(text)`).
- `GPT2BPETokenizer`: `vocab_file` = vocab.json and `merge_file` = merges.txt; byte-level BPE with
  the GPT-2 split pattern, built with `tokenizers` (NeoX's own copy of OpenAI's encoder gives the same ids).
- `CharLevelTokenizer`: UTF-8 bytes, vocabulary 512, EOD 0 (as NeoX).

Vocabulary size and EOD are read from the files themselves (`vocabulary`), without the tokenizer
libraries, so that `expand` and `plan` work in a core install; encoding needs `tokenizers` or
`sentencepiece` (`load_tokenizer`).

The EOD rule (`eod_of`): NeoX uses the id of `<|endoftext|>`, which Llama-style tokenizers do not
have (NeoX's HFTokenizer then gives None, its SPMTokenizer silently the unknown id). Here the EOD is
the first of `EOD_CANDIDATES` the vocabulary really contains (for SentencePiece: a piece that is
not the unknown piece), else SentencePiece's own end-of-sentence control piece, else None. So
`<|endoftext|>` wherever NeoX finds it, and `</s>` for Llama's tokenizers. prepare-data can name
another token (`--eod-token`). Nothing is downloaded: a missing file is a `UserError`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neox_progressive.errors import UserError

EOD_TOKEN = "<|endoftext|>"
"""NeoX's end-of-document token."""
EOD_CANDIDATES = (EOD_TOKEN, "</s>", "<|end_of_text|>", "<eos>")
TYPES = ("HFTokenizer", "SPMTokenizer", "GPT2BPETokenizer", "CharLevelTokenizer")
CHAR_VOCAB = 512


def eod_of(table: Mapping[str, int], fallback: str | None = None) -> int | None:
    """The EOD rule: the id of the first of `EOD_CANDIDATES` in `table` (token -> id), else of `fallback`, else None."""
    for token in (*EOD_CANDIDATES, fallback):
        if token is not None and token in table:
            return int(table[token])
    return None


@dataclass(frozen=True)
class Vocabulary:
    """What a tokenizer file says without encoding anything: its kind, size, token table and EOD."""

    kind: str
    """NeoX `tokenizer_type` (one of TYPES)."""
    path: str | None
    """The vocabulary file (None for CharLevelTokenizer)."""
    size: int
    """The unpadded vocabulary size NeoX pads (distinct ids)."""
    eod: int | None
    """The EOD id by the rule above (`eod_of`)."""
    table: Mapping[str, int] = field(default_factory=dict, repr=False)
    """token -> id (for SentencePiece without the unknown piece)."""
    merges: str | None = None
    """GPT2BPETokenizer: the merges file."""

    def id_of(self, token: str) -> int | None:
        return None if token not in self.table else int(self.table[token])


def resolve_file(path: str | None, base_dir: Path | None, key: str, kind: str, *, required: bool = True) -> Path | None:
    """A config's tokenizer file: as written, else next to the config (`base_dir`); None or UserError if absent."""
    if not path:
        if not required:
            return None
        raise UserError(f"config key {key} is not set; {kind} needs it (the tokenizer file the member was trained with)")
    p = Path(path)
    if not p.is_absolute() and not p.exists() and base_dir is not None and (base_dir / p).exists():
        p = base_dir / p
    if p.is_file():
        return p
    if not required:
        return None
    raise UserError(f"tokenizer file {str(path)!r} (config key {key}, {kind}) does not exist on this machine; "
                    "copy it here and point the config at it (nothing is downloaded)")


def _json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not {what} ({exc})") from None


def _hf_table(path: Path) -> tuple[dict[str, int], int]:
    data = _json(path, "an HF tokenizers JSON file")
    vocab = data.get("model", {}).get("vocab", {}) if isinstance(data, dict) else None
    if not isinstance(vocab, (dict, list)):
        raise UserError(f"{path} is not an HF tokenizers JSON file (no model.vocab)")
    table = dict(vocab) if isinstance(vocab, dict) else {row[0]: i for i, row in enumerate(vocab)}
    for tok in data.get("added_tokens", []):
        table[tok["content"]] = tok["id"]
    ids = set(table.values()) | (set(range(len(vocab))) if isinstance(vocab, list) else set())
    return table, len(ids)


def _spm_table(path: Path) -> tuple[dict[str, int], int, str]:
    from neox_progressive.spm_json import CONTROL, UNKNOWN, read_spm

    model = read_spm(path.read_bytes(), str(path))
    table: dict[str, int] = {}
    for i, (piece, _, kind) in enumerate(model.pieces):
        if kind != UNKNOWN:
            table.setdefault(piece, i)
    eos = model.eos_piece if any(p == model.eos_piece and k == CONTROL for p, _, k in model.pieces) else None
    return table, len(model.pieces), eos


def vocabulary(kind: str, path: Path | None, merges: Path | None = None) -> Vocabulary:
    """The vocabulary of a tokenizer of NeoX type `kind` in `path` (CharLevelTokenizer: no file)."""
    if kind == "CharLevelTokenizer":
        return Vocabulary(kind, None, CHAR_VOCAB, 0)
    fallback = None
    if kind == "HFTokenizer":
        table, size = _hf_table(path)
    elif kind == "SPMTokenizer":
        table, size, fallback = _spm_table(path)
    elif kind in ("GPT2BPETokenizer", "HFGPT2Tokenizer"):
        table = _json(path, "a GPT-2 vocab.json")
        if not isinstance(table, dict):
            raise UserError(f"{path} is not a GPT-2 vocab.json (expected a JSON object of token -> id)")
        size = len(table)
    else:
        raise UserError(f"tokenizer_type {kind!r} is not supported; expected one of {', '.join(TYPES)}")
    return Vocabulary(kind, str(path), size, eod_of(table, fallback), table, None if merges is None else str(merges))


def tokenizer_type(cfg: Mapping[str, Any], extra: tuple[str, ...] = ()) -> str:
    """The config's `tokenizer_type` spelled as NeoX spells it (NeoX's default: GPT2BPETokenizer)."""
    ttype = str(cfg.get("tokenizer_type") or "GPT2BPETokenizer")
    kind = next((t for t in (*TYPES, *extra) if t.lower() == ttype.lower()), None)
    if kind is None:
        raise UserError(f"tokenizer_type {ttype!r} is not supported; expected one of {', '.join(TYPES)}")
    return kind


def config_vocabulary(cfg: Mapping[str, Any], base_dir: Path | None = None, *, required: bool = True) -> Vocabulary | None:
    """The vocabulary of the tokenizer a merged NeoX config names; None if `required` is false and its file is not here."""
    try:
        kind = tokenizer_type(cfg, () if required else ("HFGPT2Tokenizer",))
    except UserError:
        if required:
            raise
        return None  # a type we cannot read: the shape takes the vocabulary from the checkpoint
    if kind == "CharLevelTokenizer":
        return vocabulary(kind, None)
    path = resolve_file(cfg.get("vocab_file"), base_dir, "vocab_file", kind, required=required)
    merges = None
    if kind == "GPT2BPETokenizer" and required:
        merges = resolve_file(cfg.get("merge_file"), base_dir, "merge_file", kind)
    return None if path is None else vocabulary(kind, path, merges)


@dataclass(frozen=True)
class Tokenizer:
    """A loaded tokenizer: `encode(text) -> ids`, `decode(ids) -> text`, its vocabulary and EOD id."""

    vocab: Vocabulary
    _encode: Callable[[str], list[int]] = field(repr=False)
    _decode: Callable[[list[int]], str] = field(repr=False)
    _encode_batch: Callable[[list[str]], list[list[int]]] | None = field(default=None, repr=False)

    @property
    def kind(self) -> str:
        return self.vocab.kind

    @property
    def path(self) -> str | None:
        return self.vocab.path

    @property
    def vocab_size(self) -> int:
        return self.vocab.size

    @property
    def eod(self) -> int | None:
        return self.vocab.eod

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._encode_batch is not None:
            return self._encode_batch(texts)
        return [self.encode(t) for t in texts]

    def decode(self, ids: list[int]) -> str:
        return self._decode(list(ids))

    def identity(self) -> str:
        """What makes two tokenizers the same: kind, vocabulary size and file contents."""
        digest = hashlib.sha256(Path(self.path).read_bytes()).hexdigest()[:16] if self.path else "-"
        return f"{self.kind}:{self.vocab_size}:{digest}"


def _needs(package: str, kind: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise UserError(f"{kind} needs the `{package}` package: pip install {package}") from None


def _hf(v: Vocabulary) -> Tokenizer:
    try:
        tok = _needs("tokenizers", v.kind).Tokenizer.from_file(v.path)
    except Exception as exc:  # the Rust side raises plain Exceptions
        raise UserError(f"{v.path} is not an HF tokenizers JSON file ({str(exc).splitlines()[0]})") from None
    return Tokenizer(v, lambda s: tok.encode(s).ids, lambda ids: tok.decode(ids, skip_special_tokens=False),
                     lambda texts: [e.ids for e in tok.encode_batch(texts)])


def _spm(v: Vocabulary) -> Tokenizer:
    spm = _needs("sentencepiece", v.kind)
    try:
        sp = spm.SentencePieceProcessor(model_file=v.path)
    except (OSError, RuntimeError) as exc:
        raise UserError(f"{v.path} is not a SentencePiece model ({str(exc).splitlines()[0]})") from None
    return Tokenizer(v, sp.encode, sp.decode, sp.encode)


def _gpt2(v: Vocabulary) -> Tokenizer:
    tk = _needs("tokenizers", v.kind)
    tok = tk.Tokenizer(tk.models.BPE.from_file(v.path, v.merges))
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    return Tokenizer(v, lambda s: tok.encode(s).ids, lambda ids: tok.decode(ids, skip_special_tokens=False),
                     lambda texts: [e.ids for e in tok.encode_batch(texts)])


def _charlevel(v: Vocabulary) -> Tokenizer:
    return Tokenizer(v, lambda s: list(s.encode("utf-8")), lambda ids: "".join(chr(max(32, min(i, CHAR_VOCAB))) for i in ids))


def load_tokenizer(v: Vocabulary) -> Tokenizer:
    """The encoder of a vocabulary (needs `tokenizers` or `sentencepiece`)."""
    return {"HFTokenizer": _hf, "SPMTokenizer": _spm, "GPT2BPETokenizer": _gpt2, "CharLevelTokenizer": _charlevel}[v.kind](v)


def config_tokenizer(cfg: Mapping[str, Any], base_dir: Path | None = None) -> Tokenizer:
    """The tokenizer of a merged NeoX config (`tokenizer_type`, `vocab_file`, `merge_file`)."""
    return load_tokenizer(config_vocabulary(cfg, base_dir))


def file_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer file: a `.model` file is SentencePiece, a `.json` file an HF tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer file {str(path)!r} does not exist")
    kind = {".json": "HFTokenizer", ".model": "SPMTokenizer"}.get(path.suffix)
    if kind is None:
        raise UserError(f"tokenizer {path}: expected a SentencePiece .model or an HF tokenizer .json file")
    return load_tokenizer(vocabulary(kind, path))
