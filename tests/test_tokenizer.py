"""One tokenizer implementation, one EOD rule: the model shape, prepare-data, evaluation and export-hf agree.

The expected vocabulary sizes and EOD ids come from the tokenizer libraries themselves (`tokenizers`'
`get_vocab_size` / `token_to_id`, `sentencepiece`'s `get_piece_size` / `piece_to_id` / `eos_id`, the GPT-2
vocab.json), as NeoX's megatron/tokenizer/tokenizer.py reads them; the EOD rule: `<|endoftext|>` where the
vocabulary has it (NeoX's), else `</s>`, `<|end_of_text|>`, `<eos>`, else SentencePiece's eos piece.
"""

from __future__ import annotations

import json

import pytest

from neox_progressive.cli import main
from neox_progressive.config import ModelShape
from neox_progressive.data import MMapDataset
from neox_progressive.tokenizer import config_tokenizer, config_vocabulary, file_tokenizer

tokenizers = pytest.importorskip("tokenizers")
spm = pytest.importorskip("sentencepiece")

WORDS = "the quick brown fox jumps over the lazy dog and then sleeps in the warm sun all day long".split()


def hf_json(path, specials):
    """A WordLevel tokenizer.json: `specials` first (ids 0..), then the words."""
    vocab = {t: i for i, t in enumerate([*specials, "[UNK]", *dict.fromkeys(WORDS)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|padding|>"])  # an added token beyond the model vocabulary
    tok.save(str(path))
    return path


def gpt2_files(tmp_path, with_eod):
    """A byte-level GPT-2 vocab.json/merges.txt trained here (NeoX's _GPT2BPETokenizer format)."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS)] * 20, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"] if with_eod else [])
    bpe.save_model(str(tmp_path))
    return tmp_path / "vocab.json", tmp_path / "merges.txt"


def spm_model(tmp_path, name, **kw):
    text = tmp_path / f"{name}.txt"
    text.write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))) + "\n")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / name), vocab_size=60,
                                   model_type="bpe", minloglevel=2, **kw)
    return tmp_path / f"{name}.model"


def cases(tmp_path):
    """name -> (NeoX config keys, expected vocabulary size, expected EOD id), both from the libraries."""
    out = {}
    for name, specials, eod in (("hf_endoftext", ["<s>", "</s>", "<|endoftext|>"], "<|endoftext|>"),
                                ("hf_llama", ["<s>", "</s>"], "</s>")):
        path = hf_json(tmp_path / f"{name}.json", specials)
        lib = tokenizers.Tokenizer.from_file(str(path))
        out[name] = ({"tokenizer_type": "HFTokenizer", "vocab_file": str(path)}, lib.get_vocab_size(), lib.token_to_id(eod))
    (tmp_path / "g").mkdir()
    vocab, merges = gpt2_files(tmp_path / "g", with_eod=True)
    out["gpt2"] = ({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(vocab), "merge_file": str(merges)},
                   len(json.loads(vocab.read_text())), json.loads(vocab.read_text())["<|endoftext|>"])
    for name, kw in (("spm_endoftext", {"control_symbols": ["<|endoftext|>"]}),  # also has </s> (id 2): NeoX's comes first
                     ("spm_llama", {}),                                          # </s> only
                     ("spm_custom_eos", {"eos_piece": "[END]"})):                # neither: SentencePiece's own eos
        path = spm_model(tmp_path, name, **kw)
        sp = spm.SentencePieceProcessor(model_file=str(path))
        want = sp.piece_to_id("<|endoftext|>") if name == "spm_endoftext" else sp.eos_id()
        out[name] = ({"tokenizer_type": "SPMTokenizer", "vocab_file": str(path)}, sp.get_piece_size(), want)
    return out


def test_one_vocabulary_size_and_eod_for_every_reader(tmp_path):
    from neox_progressive.hf_tokenizer import export_tokenizer

    all_cases = cases(tmp_path)
    assert all_cases["spm_endoftext"][2] != spm.SentencePieceProcessor(
        model_file=all_cases["spm_endoftext"][0]["vocab_file"]).eos_id()  # the rule's order matters here
    for name, (keys, size, eod) in all_cases.items():
        cfg = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 384, "seq_length": 64,
               "pos_emb": "rotary", "norm": "rmsnorm", "activation": "swiglu", "no_weight_tying": True,
               "use_bias_in_attn_linear": False, "use_bias_in_mlp": False, "make_vocab_size_divisible_by": 1, **keys}
        assert eod is not None and eod >= 0, name
        assert ModelShape.from_neox(cfg).vocab_size == size, name                 # the shape (padded vocabulary)
        assert config_vocabulary(cfg).size == size, name
        tok = config_tokenizer(cfg)                                                 # evaluation
        assert (tok.vocab_size, tok.eod) == (size, eod), name
        assert export_tokenizer(cfg, None, size).specials["eos"][0] == eod, name    # export-hf
        if keys["tokenizer_type"] != "GPT2BPETokenizer":                            # prepare-data (a file)
            assert file_tokenizer(keys["vocab_file"]).eod == eod, name


@pytest.mark.parametrize("name", ["hf_llama", "spm_endoftext", "spm_custom_eos"])
def test_prepare_data_appends_the_same_eod(tmp_path, name, capsys):
    keys, _, eod = cases(tmp_path)[name]
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": " ".join(WORDS[i:i + 5])}) + "\n" for i in range(6)))
    assert main(["prepare-data", str(docs), "--tokenizer", keys["vocab_file"], "--out", str(tmp_path / "d"), "--quiet"]) == 0
    assert f"EOD id {eod})" in capsys.readouterr().out
    items = [MMapDataset(tmp_path / "d")[i] for i in range(6)]
    assert all(int(x[-1]) == eod for x in items)
    assert not any(int(t) == eod for x in items for t in x[:-1])


def test_charlevel_and_missing_files(tmp_path):
    cfg = {"tokenizer_type": "CharLevelTokenizer"}
    tok = config_tokenizer(cfg)
    assert (tok.vocab_size, tok.eod, tok.encode("hé")) == (512, 0, list("hé".encode()))
    assert config_vocabulary({"tokenizer_type": "HFTokenizer", "vocab_file": str(tmp_path / "x.json")}, required=False) is None
    assert config_vocabulary({"tokenizer_type": "TiktokenTokenizer", "vocab_file": "x"}, required=False) is None
    from neox_progressive.errors import UserError
    with pytest.raises(UserError, match="does not exist on this machine"):
        config_tokenizer({"tokenizer_type": "HFTokenizer", "vocab_file": str(tmp_path / "x.json")})
