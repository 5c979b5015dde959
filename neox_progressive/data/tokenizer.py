"""Tokenizers the way GPT-NeoX uses them to prepare data (megatron/tokenizer/tokenizer.py).

- `SPMTokenizer` (NeoX `tokenizer_type: SPMTokenizer`, `vocab_file: x.model`): ids =
  `SentencePieceProcessor.encode(text)`, vocab size = `get_piece_size()`, EOD =
  `piece_to_id("<|endoftext|>")`.
- `HFTokenizer` (`tokenizer_type: HFTokenizer`, `vocab_file: tokenizer.json`): ids =
  `tokenizers.Tokenizer.encode(text).ids` (post-processor specials included, as NeoX), vocab size =
  `get_vocab_size()`, EOD = `token_to_id("<|endoftext|>")`.

NeoX does not check that `<|endoftext|>` exists: SentencePiece then returns the unknown id and the
HF tokenizer None (preprocess_data.py then crashes). We refuse such a tokenizer unless another EOD
token is named explicitly.

`train_sentencepiece` trains a small model on the data itself (no downloads), with
`<|endoftext|>` as a control symbol so NeoX finds its EOD.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

from neox_progressive.errors import UserError

EOD_TOKEN = "<|endoftext|>"


class SPMTokenizer:
    type_name = "SPMTokenizer"

    def __init__(self, path: str | Path, eod_token: str | None = EOD_TOKEN):
        try:
            import sentencepiece as spm
        except ImportError:
            raise UserError("reading a SentencePiece .model needs the sentencepiece package: pip install sentencepiece") from None
        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            raise UserError(f"{path} is not a SentencePiece model ({str(exc).splitlines()[0]})") from None
        self.vocab_size = int(self.sp.get_piece_size())
        self.eod = None if eod_token is None else int(self.sp.piece_to_id(eod_token))
        if eod_token is not None and self.sp.id_to_piece(self.eod) != eod_token:
            raise UserError(
                f"{path} has no piece {eod_token!r}, so NeoX's SPMTokenizer would use the unknown id {self.eod} as EOD; "
                "name the model's end-of-document piece with --eod-token (e.g. '</s>') or let prepare-data train a model"
            )

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)


class HFTokenizer:
    type_name = "HFTokenizer"

    def __init__(self, path: str | Path, eod_token: str | None = EOD_TOKEN):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError("reading a tokenizer.json needs the tokenizers package: pip install tokenizers") from None
        self.path = Path(path)
        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exceptions
            raise UserError(f"{path} is not an HF tokenizers JSON file ({str(exc).splitlines()[0]})") from None
        self.vocab_size = int(self.tok.get_vocab_size())
        eod = None if eod_token is None else self.tok.token_to_id(eod_token)
        if eod_token is not None and eod is None:
            raise UserError(
                f"{path} has no token {eod_token!r}, which NeoX's HFTokenizer uses as EOD (its preprocess_data.py "
                "would fail); name the tokenizer's end-of-document token with --eod-token (e.g. '</s>')"
            )
        self.eod = None if eod is None else int(eod)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]


def load_tokenizer(path: str | Path, eod_token: str | None = EOD_TOKEN) -> SPMTokenizer | HFTokenizer:
    """A `.model` file is SentencePiece, a `.json` file an HF tokenizer; `eod_token` None: no EOD needed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer file {str(path)!r} does not exist")
    if path.suffix == ".json":
        return HFTokenizer(path, eod_token)
    if path.suffix == ".model":
        return SPMTokenizer(path, eod_token)
    raise UserError(f"tokenizer {path}: expected a SentencePiece .model or an HF tokenizer .json file")


def train_sentencepiece(texts: Iterable[str], vocab_size: int, out: str | Path, *, model_type: str = "bpe",
                        max_lines: int = 2_000_000) -> Path:
    """Train a SentencePiece model on `texts` and write it to `out` (a `.model` file).

    Deterministic for the same input (single-threaded, no sentence sampling). Pieces: `<unk>` = 0,
    `<|endoftext|>` = 1 (a control symbol: never produced from text, found by NeoX as its EOD),
    a newline piece, no BOS/EOS/PAD. Lossless: no normalization, whitespace kept as is, unknown
    characters fall back to byte pieces, so decode(encode(text)) == text.
    """
    try:
        import sentencepiece as spm
    except ImportError:
        raise UserError("training a tokenizer needs the sentencepiece package: pip install sentencepiece") from None

    def lines():
        n = 0
        for text in texts:
            for line in text.splitlines():
                if line.strip():
                    yield line
                    n += 1
                    if n >= max_lines:
                        return

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
            control_symbols=[EOD_TOKEN], user_defined_symbols=["\n"], normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, max_sentence_length=1 << 14, minloglevel=2,
        )
    except RuntimeError as exc:
        msg = str(exc).splitlines()[0]
        need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", msg)
        if need:
            raise UserError(f"a {vocab_size}-piece vocabulary cannot hold the {need.group(1)} characters, byte pieces and "
                            f"specials this text needs; pass --vocab-size {need.group(1)} or more") from None
        if "Vocabulary size" in msg:
            most = re.search(r"<= (\d+)", msg)
            raise UserError(f"the text is too small for a {vocab_size}-piece vocabulary (it yields at most "
                            f"{most.group(1) if most else 'fewer'} pieces); pass "
                            f"{f'--vocab-size {most.group(1)} or less' if most else 'a smaller --vocab-size'}, or more text"
                            ) from None
        raise UserError(f"training the SentencePiece model failed: {msg}") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out)
    return out
