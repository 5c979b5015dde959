"""Training a tokenizer on the data itself (reading one: neox_progressive/tokenizer.py).

`train_sentencepiece` trains a small model on the data itself (no downloads), with
`<|endoftext|>` as a control symbol so NeoX finds its EOD.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from pathlib import Path

from neox_progressive.errors import UserError
from neox_progressive.tokenizer import EOD_TOKEN


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
