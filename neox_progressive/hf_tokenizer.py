"""The member's tokenizer in an HF export: `AutoTokenizer` and lm-eval's HFLM load it as it is.

What is written, per NeoX `tokenizer_type` (megatron/tokenizer/tokenizer.py):

- `HFTokenizer`: the config's `tokenizer.json`, byte for byte (NeoX encodes with
  `tokenizers.Tokenizer.encode(text).ids`, which is what `PreTrainedTokenizerFast` does).
- `SPMTokenizer`: a `tokenizer.json` converted from the SentencePiece model so that it gives
  `SentencePieceProcessor.encode(text)`'s ids (spm_json.py says how, and which texts cannot be
  equal), plus the `.model` file itself as `tokenizer.model`.
- `GPT2BPETokenizer`: the config's `vocab.json` and `merges.txt` (`GPT2Tokenizer`, no prefix space).

Special ids (config.json, generation_config.json, tokenizer_config.json): NeoX separates documents
with its EOD token and never adds a BOS, so eos = the EOD (`<|endoftext|>`, or the first of
`</s>`, `<|end_of_text|>`, `<eos>` the vocabulary has: the one EOD rule of tokenizer.py) and bos = the
same token (the token a document follows in training: our reading, GPT-2's convention); pad =
`<|padding|>` where the vocabulary has it (NeoX's HFTokenizer pad), else eos. `--bos-id` and
`--eos-id` override. No BOS/EOS is added to encoded text, as NeoX.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neox_progressive.errors import UserError

KINDS = ("HFTokenizer", "SPMTokenizer", "GPT2BPETokenizer")
PAD_TOKEN = "<|padding|>"


@dataclass(frozen=True)
class ExportTokenizer:
    """Everything the export gets for its tokenizer, built (and checked) before anything is written."""

    kind: str
    """NeoX tokenizer_type."""
    source: str
    """The tokenizer file the config names."""
    vocab_size: int
    tokenizer_class: str
    specials: dict[str, tuple[int, str]]
    """bos / eos / pad -> (id, token)."""
    model_max_length: int
    files: dict[str, bytes] = field(repr=False, default_factory=dict)
    """File name in the export -> contents."""

    def ids(self) -> dict[str, int]:
        return {f"{k}_token_id": v[0] for k, v in self.specials.items()}

    def write(self, out: Path) -> None:
        """Tokenizer files into the export dir; special ids into its config.json and generation_config.json."""
        out = Path(out)
        for name, data in self.files.items():
            (out / name).write_bytes(data)
        tokens = {f"{k}_token": v[1] for k, v in self.specials.items()}
        # model_input_names: no token_type_ids (transformers 4.38's generate refuses them for a Llama model)
        config = {"tokenizer_class": self.tokenizer_class, **tokens, "model_max_length": self.model_max_length,
                  "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
                  "model_input_names": ["input_ids", "attention_mask"]}
        if self.kind == "GPT2BPETokenizer":
            config.update(add_prefix_space=False, errors="replace")
        _dump(out / "tokenizer_config.json", config)
        _dump(out / "special_tokens_map.json", tokens)
        for name, extra in (("config.json", {}), ("generation_config.json", {"do_sample": False})):
            path = out / name
            data = json.loads(path.read_text()) if path.exists() else {}
            _dump(path, {**data, **self.ids(), **extra})


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _vocab_of(kind: str, path: Path, spm_model) -> dict[int, str]:
    """id -> token of the tokenizer file (what tokenizer_config.json names the specials by)."""
    if kind == "SPMTokenizer":
        return {i: p for i, (p, _, _) in enumerate(spm_model.pieces)}
    if kind == "HFTokenizer":
        from tokenizers import Tokenizer

        table = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    else:
        table = json.loads(path.read_text())
    return {int(i): t for t, i in table.items()}


def _special(name: str, wanted: int | None, default: int | None, vocab: dict[int, str], source: str) -> tuple[int, str]:
    i = default if wanted is None else wanted
    if i is None:
        raise UserError(f"{source} has no end-of-text token (<|endoftext|>, </s>, <|end_of_text|> or <eos>); name its id "
                        "with --eos-id (and --bos-id), or pass --no-tokenizer")
    if i not in vocab:
        raise UserError(f"--{name}-id {i}: the tokenizer {source} has no token with that id (ids 0..{max(vocab)}); "
                        f"pass an id of the tokenizer's vocabulary")
    return int(i), vocab[i]


def export_tokenizer(cfg: dict[str, Any], base_dir: Path | None, vocab_rows: int, *, seq_length: int = 2048,
                     bos: int | None = None, eos: int | None = None) -> ExportTokenizer:
    """The tokenizer a merged NeoX config names, ready for an export whose embedding has `vocab_rows` rows."""
    from neox_progressive.tokenizer import config_tokenizer, resolve_file

    ttype = str(cfg.get("tokenizer_type") or "GPT2BPETokenizer")
    kind = next((k for k in KINDS if k.lower() == ttype.lower()), None)
    if kind is None:
        raise UserError(f"tokenizer_type {ttype}: export-hf writes HFTokenizer, SPMTokenizer and GPT2BPETokenizer "
                        "tokenizers; pass --no-tokenizer to export the weights without one")
    if not cfg.get("vocab_file"):
        raise UserError(f"config key vocab_file is not set, so export-hf cannot write the member's {kind} tokenizer "
                        "(AutoTokenizer, lm-eval and vLLM need it): set vocab_file as in the member's training config, "
                        "or pass --no-tokenizer")
    tok = config_tokenizer(cfg, base_dir)
    path = Path(tok.path)
    if tok.vocab_size > vocab_rows:
        raise UserError(f"the tokenizer {path} has {tok.vocab_size} tokens but the checkpoint's embedding only "
                        f"{vocab_rows} rows: the config names another tokenizer than the one the model was trained with")
    files, spm_model = {}, None
    if kind == "HFTokenizer":
        files["tokenizer.json"] = path.read_bytes()
        cls = "PreTrainedTokenizerFast"
    elif kind == "SPMTokenizer":
        from neox_progressive.spm_json import read_spm

        data = path.read_bytes()
        spm_model = read_spm(data, str(path))
        files["tokenizer.model"] = data
        cls = "PreTrainedTokenizerFast"
    else:
        merges = resolve_file(cfg.get("merge_file"), base_dir, "merge_file", kind)
        files.update({"vocab.json": path.read_bytes(), "merges.txt": merges.read_bytes()})
        cls = "GPT2Tokenizer"
    vocab = _vocab_of(kind, path, spm_model)
    source = str(path)
    eos_s = _special("eos", eos, tok.eod, vocab, source)
    bos_s = _special("bos", bos, eos_s[0], vocab, source)
    pad_id = next((i for i, t in vocab.items() if t == PAD_TOKEN), eos_s[0])
    specials = {"bos": bos_s, "eos": eos_s, "pad": (pad_id, vocab[pad_id])}
    if spm_model is not None:
        from neox_progressive.spm_json import spm_tokenizer_json

        ids = sorted({v[0] for v in specials.values()})
        files["tokenizer.json"] = spm_tokenizer_json(spm_model, ids, source).encode()
    return ExportTokenizer(kind, source, tok.vocab_size, cls, specials, int(seq_length), files)
