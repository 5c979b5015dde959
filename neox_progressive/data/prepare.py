"""Text -> NeoX mmap dataset(s), the library side of `neox-progressive prepare-data`.

Does what NeoX's `tools/datasets/preprocess_data.py --dataset-impl mmap --append-eod` does for one
JSONL key (one item per document: its token ids, then the tokenizer's EOD id; dtype uint16 below
65500 tokens, else int32), with three differences: the output is exactly `<prefix>.bin/.idx` (NeoX
appends `_text_document`), outputs are written atomically, and documents can be split off into a
validation dataset (chosen by a hash of their text, so the choice does not depend on order).

Beside the data: `<prefix>.meta.json` (counts, tokenizer, the NeoX config keys that use it, inputs
and command line), and, when no tokenizer is given, the SentencePiece model trained on the data
(`<prefix>.tokenizer.model`, for `tokenizer_type: SPMTokenizer`).
"""

from __future__ import annotations

import json
import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from neox_progressive import __version__
from neox_progressive.data.mmap_dataset import DatasetBuilder, best_fitting_dtype, paths_of
from neox_progressive.data.tokenizer import train_sentencepiece
from neox_progressive.errors import UserError
from neox_progressive.tokenizer import EOD_CANDIDATES, file_tokenizer

BATCH_DOCS = 256


@dataclass
class PreparedData:
    """What `prepare_data` wrote."""

    train_prefix: str
    valid_prefix: str | None
    tokenizer_type: str
    vocab_file: str
    vocab_size: int
    eod_id: int | None
    train_documents: int = 0
    train_tokens: int = 0
    valid_documents: int = 0
    valid_tokens: int = 0
    dtype: str = ""
    inputs: list[str] = field(default_factory=list)

    def neox_keys(self) -> dict:
        """The NeoX config keys that point a stage at this data."""
        keys = {"tokenizer_type": self.tokenizer_type, "vocab_file": self.vocab_file, "data_impl": "mmap",
                "train_data_paths": [self.train_prefix], "train_data_weights": [1.0]}
        if self.valid_prefix:
            keys |= {"valid_data_paths": [self.valid_prefix], "valid_data_weights": [1.0],
                     "test_data_paths": [self.valid_prefix], "test_data_weights": [1.0]}
        return keys


def is_valid_doc(text: str, fraction: float) -> bool:
    """Deterministic held-out choice: crc32 of the text, so re-runs and re-orderings agree."""
    return fraction > 0 and zlib.crc32(text.encode("utf-8", "replace")) % 1_000_000 < fraction * 1_000_000


def output_paths(out: str, valid_out: str | None, trains_tokenizer: bool) -> list[Path]:
    paths = [*paths_of(out), Path(out + ".meta.json")]
    if valid_out:
        paths += paths_of(valid_out)
    if trains_tokenizer:
        paths.append(Path(out + ".tokenizer.model"))
    return paths


def prepare_data(documents: Callable[[], Iterable[str]], out: str | Path, *, tokenizer: str | Path | None = None,
                 vocab_size: int = 8000, spm_model_type: str = "bpe", valid_fraction: float = 0.0,
                 valid_out: str | Path | None = None, append_eod: bool = True, eod_token: str | None = None,
                 force: bool = False, quiet: bool = False, inputs: list[str] | None = None) -> PreparedData:
    """Tokenize documents into a NeoX mmap dataset (and a validation one).

    Args:
        documents: a function returning a fresh iterable of document texts (called twice when a
            tokenizer is trained on the data first).
        out: output prefix of the training dataset.
        tokenizer: a SentencePiece `.model` or HF `tokenizer.json`; None trains a SentencePiece
            model of `vocab_size` pieces on the (training) documents, saved as `<out>.tokenizer.model`.
        valid_fraction: share of documents held out into `valid_out` (default `<out>_valid`).
        append_eod: end every document with the EOD id (NeoX's `--append-eod`).
        eod_token: the EOD token; None: the tokenizer's EOD (neox_progressive.tokenizer.eod_of).
        force: replace existing outputs.
    """
    out = str(out)
    if not 0 <= valid_fraction < 1:
        raise UserError(f"--valid-fraction must be in [0, 1), got {valid_fraction}")
    valid_out = str(valid_out) if valid_out else (out + "_valid" if valid_fraction > 0 else None)
    if valid_out and valid_fraction == 0:
        raise UserError("--valid-out needs --valid-fraction > 0 (the share of documents to hold out)")
    existing = [str(p) for p in output_paths(out, valid_out, tokenizer is None) if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]} already exists; choose another --out or pass --force to replace it")
    if tokenizer is None:
        tok_path = Path(out + ".tokenizer.model")
        train_texts = (d for d in documents() if not is_valid_doc(d, valid_fraction))
        _require_text(documents, valid_fraction, inputs)
        if not quiet:
            print(f"training a SentencePiece {spm_model_type} tokenizer ({vocab_size} pieces) on the data ...", file=sys.stderr)
        train_sentencepiece(train_texts, vocab_size, tok_path, model_type=spm_model_type)
        try:
            return _tokenize(documents, out, tok_path, valid_out, valid_fraction, append_eod, eod_token, quiet, inputs)
        except BaseException:
            tok_path.unlink(missing_ok=True)  # nothing half-made stays behind
            raise
    return _tokenize(documents, out, Path(tokenizer), valid_out, valid_fraction, append_eod, eod_token, quiet, inputs)


def _eod(tok, eod_token: str | None) -> int:
    """The EOD id appended to each document: the named token's, else the tokenizer's (the one EOD rule)."""
    if eod_token is None:
        if tok.eod is None:
            raise UserError(f"{tok.path} has no end-of-document token (none of {', '.join(EOD_CANDIDATES)}); name the "
                            "tokenizer's end-of-document token with --eod-token, or pass --no-eod")
        return tok.eod
    eod = tok.vocab.id_of(eod_token)
    if eod is None:
        raise UserError(f"{tok.path} has no token {eod_token!r} (--eod-token); name a token of its vocabulary "
                        f"(its EOD by default: {tok.eod if tok.eod is not None else 'none'})")
    return eod


def _require_text(documents: Callable[[], Iterable[str]], valid_fraction: float, inputs: list[str] | None) -> None:
    """Refuse, in words, inputs that leave no text to train a tokenizer on (SentencePiece would fail with
    its internal `trainer_interface.cc [!sentences_.empty()]`)."""
    held_out = 0
    for text in documents():
        if not text.strip():
            continue
        if not is_valid_doc(text, valid_fraction):
            return
        held_out += 1
    what = ", ".join(inputs or []) or "the input"
    if held_out:
        raise UserError(f"{what}: all {held_out} non-empty document(s) went to the validation data (--valid-fraction "
                        f"{valid_fraction}), so no text is left to train the tokenizer on: give more documents or a "
                        "smaller --valid-fraction")
    raise UserError(f"{what}: no text to tokenize (the input is empty or blank); pass files that hold text")


def _tokenize(documents, out: str, tokenizer: Path, valid_out: str | None, valid_fraction: float, append_eod: bool,
              eod_token: str | None, quiet: bool, inputs: list[str] | None) -> PreparedData:
    from neox_progressive.progress import progress_bar

    tok = file_tokenizer(tokenizer)
    eod = _eod(tok, eod_token) if append_eod else None
    dtype = best_fitting_dtype(tok.vocab_size)
    # absolute paths: NeoX runs from its own checkout, where relative paths would point elsewhere
    absolute = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
    result = PreparedData(absolute(out), absolute(valid_out), tok.kind, absolute(tokenizer), tok.vocab_size,
                          eod, dtype=dtype.__name__, inputs=list(inputs or []))
    train_b = DatasetBuilder(out, dtype, force=True)
    valid_b = DatasetBuilder(valid_out, dtype, force=True) if valid_out else None
    with train_b, (valid_b or _Null()), progress_bar(unit="doc", quiet=quiet, desc="tokenizing") as bar:
        batch: list[str] = []

        def flush():
            for text, ids in zip(batch, tok.encode_batch(batch)):
                if append_eod:
                    ids = [*ids, eod]
                (valid_b if valid_b is not None and is_valid_doc(text, valid_fraction) else train_b).add_document(ids)
            bar.update(len(batch))
            batch.clear()

        for text in documents():
            batch.append(text)
            if len(batch) >= BATCH_DOCS:
                flush()
        flush()
        if not train_b.sizes:
            raise UserError("no training documents: the inputs are empty (or --valid-fraction took them all)")
    result.train_documents, result.train_tokens = len(train_b.sizes), train_b.num_tokens
    if valid_b is not None:
        result.valid_documents, result.valid_tokens = len(valid_b.sizes), valid_b.num_tokens
    _write_meta(result)
    return result


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _write_meta(result: PreparedData) -> None:
    meta = {"format": "neox-mmap", "version": __version__, "command": sys.argv, **asdict(result),
            "neox_config": result.neox_keys()}
    path = Path(result.train_prefix + ".meta.json")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(path)
