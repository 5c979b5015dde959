"""A SentencePiece model as an HF `tokenizer.json` that gives SentencePiece's ids.

NeoX's SPMTokenizer encodes with `SentencePieceProcessor.encode(text)`. transformers' own
conversion of a SentencePiece model (LlamaTokenizerFast) does not always give those ids: it
adds a BOS, handles the dummy prefix and spaces its own way (`legacy`), and differs across
versions. So the export carries a `tokenizer.json` built here from the model file itself,
read by `PreTrainedTokenizerFast` as it is (transformers 4.38 and current, vLLM):

- normalizer = SentencePiece's normalizer: the precompiled character map (if the model has
  one), `remove_extra_whitespaces` (runs of spaces collapsed, leading and trailing ones
  dropped), the dummy prefix `▁` (only for non-empty text, as SentencePiece), spaces -> `▁`;
  no pre-tokenizer (SentencePiece does not split the text before its model either);
- BPE: the vocabulary with SentencePiece's ids; merges are every split l + r of a normal piece
  into two normal pieces, ranked by the piece's score (SentencePiece merges the adjacent pair
  whose concatenation has the highest score). User-defined symbols are never merged
  (SentencePiece freezes them); byte fallback and fused unknowns as SentencePiece;
- Unigram: the pieces with their scores; control, byte and unused pieces get a score no
  text path ever prefers (SentencePiece keeps them out of its lattice).

What cannot be equal (our reading of the differences; tests/test_hf_tokenizer.py shows them):
text containing the literal spelling of a special token of the export (e.g. `<|endoftext|>`):
transformers always encodes it as that token (and the text after it gets the dummy prefix
again: an HF added token splits the text), SentencePiece spells it out. Likewise after a
user-defined symbol that must be an added token (one of several characters, or any with a
character map, e.g. nmt_nfkc): the dummy prefix comes again after it and, with
remove_extra_whitespaces, spaces next to it are dropped (single characters without a map, such
as prepare-data's newline piece, are exact). Unigram models only: the literal spelling of a
control or byte piece (`<s>`, `<0x41>`) whose characters are not all in the vocabulary. Ties
(two BPE pieces of equal score, two unigram segmentations of equal score) may be broken
differently.

The model file is read with a small protobuf wire-format reader (no protobuf package needed:
NeoX's environment has none).
"""

from __future__ import annotations

import base64
import json
import struct
from dataclasses import dataclass

from neox_progressive.errors import UserError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE = 1, 2
SPACE = "\u2581"


@dataclass(frozen=True)
class SpmModel:
    """What a SentencePiece `.model` says about encoding (sentencepiece_model.proto)."""

    pieces: list[tuple[str, float, int]]
    """(piece, score, type) in id order."""
    model_type: int = UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    normalizer: str = ""
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    unk_surface: str = " \u2047 "
    """What decoding shows for the unknown piece."""
    eos_piece: str = "</s>"
    """The end-of-sentence piece (SentencePiece's eos_id() is its id where it is a control piece)."""

    def ids_of(self, kind: int) -> list[int]:
        return [i for i, p in enumerate(self.pieces) if p[2] == kind]


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _fields(buf: bytes):
    """(field number, value) of one protobuf message: ints for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise ValueError(f"protobuf wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated protobuf message")
        yield num, value


def read_spm(data: bytes, name: str = "the SentencePiece model") -> SpmModel:
    """Parse a SentencePiece model file (ModelProto): pieces, model type, normalizer spec."""
    pieces: list[tuple[str, float, int]] = []
    kw: dict = {}
    try:
        for num, value in _fields(data):
            if num == 1:
                piece, score, kind = "", 0.0, NORMAL
                for n, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3:
                        kind = v
                pieces.append((piece, score, kind))
            elif num == 2:
                names = {3: "model_type", 24: "treat_whitespace_as_suffix", 35: "byte_fallback", 44: "unk_surface",
                         47: "eos_piece"}
                kw.update({names[n]: v for n, v in _fields(value) if n in names})
            elif num == 3:
                for n, v in _fields(value):
                    if n == 1:
                        kw["normalizer"] = v.decode("utf-8")
                    elif n == 2:
                        kw["charsmap"] = bytes(v)
                    elif n in (3, 4, 5):
                        kw[{3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}[n]] = bool(v)
    except (ValueError, IndexError, UnicodeDecodeError, struct.error) as exc:
        raise UserError(f"{name} is not a SentencePiece model ({exc})") from None
    if not pieces:
        raise UserError(f"{name} is not a SentencePiece model (no pieces)")
    for key in ("byte_fallback", "treat_whitespace_as_suffix"):
        if key in kw:
            kw[key] = bool(kw[key])
    for key in ("unk_surface", "eos_piece"):
        if key in kw:
            kw[key] = kw[key].decode("utf-8")
    return SpmModel(pieces=pieces, **kw)


def _normalizer(m: SpmModel) -> dict | None:
    steps: list[dict] = []
    if m.charsmap:
        steps.append({"type": "Precompiled", "precompiled_charsmap": base64.b64encode(m.charsmap).decode()})
    if m.remove_extra_whitespaces:
        steps.append({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "})
        steps.append({"type": "Replace", "pattern": {"Regex": "^ | $"}, "content": ""})
    if m.add_dummy_prefix:
        steps.append({"type": "Prepend", "prepend": SPACE})
    if m.escape_whitespaces:
        steps.append({"type": "Replace", "pattern": {"String": " "}, "content": SPACE})
    return {"type": "Sequence", "normalizers": steps} if steps else None


def _decoder(m: SpmModel) -> dict:
    steps: list[dict] = []
    unk = m.ids_of(UNKNOWN)
    if unk:
        steps.append({"type": "Replace", "pattern": {"String": m.pieces[unk[0]][0]}, "content": m.unk_surface})
    if m.escape_whitespaces:
        steps.append({"type": "Replace", "pattern": {"String": SPACE}, "content": " "})
    if m.byte_fallback:
        steps.append({"type": "ByteFallback"})
    steps.append({"type": "Fuse"})
    if m.add_dummy_prefix:
        steps.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {"type": "Sequence", "decoders": steps}


def bpe_merges(m: SpmModel) -> list[tuple[str, str]]:
    """Every split of a normal piece into two normal pieces, highest-scoring result first."""
    normal = {p: i for i, (p, _, kind) in enumerate(m.pieces) if kind == NORMAL}
    ranked = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-m.pieces[i][1], i, normal[left], normal[right], left, right))
    ranked.sort()
    return [(r[4], r[5]) for r in ranked]


def _model(m: SpmModel) -> dict:
    unk = m.ids_of(UNKNOWN)
    unk_piece = m.pieces[unk[0]][0] if unk else None
    if m.model_type == BPE:
        merges = bpe_merges(m)
        if any(" " in a or " " in b for a, b in merges):
            raise UserError("a SentencePiece BPE piece contains a plain space; its merges cannot be written "
                            "in the tokenizer.json format every transformers version reads")
        return {"type": "BPE", "dropout": None, "unk_token": unk_piece, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": m.byte_fallback,
                "vocab": {p: i for i, (p, _, _) in enumerate(m.pieces)}, "merges": [f"{a} {b}" for a, b in merges]}
    usable = [s for _, s, kind in m.pieces if kind in (NORMAL, USER_DEFINED)]
    never = min(usable, default=0.0) - 1e6  # out of reach: any path through normal pieces scores higher
    vocab = [[p, s if kind in (NORMAL, USER_DEFINED) else never] for p, s, kind in m.pieces]
    return {"type": "Unigram", "unk_id": unk[0] if unk else None, "vocab": vocab, "byte_fallback": m.byte_fallback}


def spm_tokenizer_json(m: SpmModel, specials: list[int], name: str = "the SentencePiece model") -> str:
    """The `tokenizer.json` text; `specials` are the ids the export names bos/eos/pad (HF added tokens)."""
    if m.model_type not in (BPE, UNIGRAM):
        kind = {3: "word", 4: "char"}.get(m.model_type, str(m.model_type))
        raise UserError(f"{name} is a SentencePiece {kind} model; export-hf converts bpe and unigram models only: "
                        "pass --no-tokenizer and add a tokenizer to the export by hand")
    if m.treat_whitespace_as_suffix:
        raise UserError(f"{name} uses treat_whitespace_as_suffix, which HF tokenizers cannot reproduce: pass "
                        "--no-tokenizer and add a tokenizer to the export by hand")
    added = [{"id": i, "content": m.pieces[i][0], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in sorted(set(specials))]
    for i in m.ids_of(USER_DEFINED):
        # SentencePiece matches user-defined symbols before normalizing and never merges them: a single
        # character the normalizer keeps needs nothing more (no merge involves it), any other is an added token
        if (len(m.pieces[i][0]) > 1 or m.charsmap) and i not in specials:
            added.append({"id": i, "content": m.pieces[i][0], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": False})
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
            "normalizer": _normalizer(m), "pre_tokenizer": None, "post_processor": None,
            "decoder": _decoder(m), "model": _model(m)}
    return json.dumps(data, ensure_ascii=False, indent=1) + "\n"
