"""prepare-data and the stdlib corpus: real text in, NeoX mmap data out, decodable back to the text."""

import json

import pytest
import sentencepiece as spm

from neox_progressive.cli import main
from neox_progressive.data import MMapDataset, read_documents, stdlib_corpus
from neox_progressive.errors import UserError


def test_stdlib_corpus_is_real_deterministic_text():
    a, b = stdlib_corpus(50_000), stdlib_corpus(50_000)
    assert a == b
    assert sum(map(len, a)) >= 50_000 and sum(map(len, a[:-1])) < 50_000
    assert stdlib_corpus(20_000) == a[: len(stdlib_corpus(20_000))]
    text = " ".join(a)
    assert all(word in text for word in (" the ", " return", " is "))     # prose, not code or random tokens
    assert len(set(a)) > 0.9 * len(a)


def test_stdlib_corpus_round_trip_through_trained_tokenizer(tmp_path, capsys):
    rc = main(["prepare-data", "--stdlib-corpus", "60000", "--vocab-size", "600", "--valid-fraction", "0.2",
               "--out", str(tmp_path / "d"), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "tokenizer_type: \"SPMTokenizer\"" in out and "valid_data_paths" in out
    meta = json.loads((tmp_path / "d.meta.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "d.tokenizer.model"))
    eod = sp.piece_to_id("<|endoftext|>")
    assert sp.id_to_piece(eod) == "<|endoftext|>" and meta["eod_id"] == eod and meta["vocab_size"] == 600
    train, valid = MMapDataset(tmp_path / "d"), MMapDataset(tmp_path / "d_valid")
    texts = [sp.decode(d[:-1].tolist()) for ds in (train, valid) for d in ds.documents()]
    assert all(d[-1] == eod and eod not in d[:-1].tolist() for ds in (train, valid) for d in ds.documents())
    # lossless: every corpus document comes back exactly, each in one of the two datasets
    assert sorted(texts) == sorted(stdlib_corpus(60000))
    assert 0.1 < len(valid) / (len(train) + len(valid)) < 0.3
    assert meta["train_tokens"] == train.num_tokens and meta["valid_tokens"] == valid.num_tokens


def test_jsonl_and_text_inputs_with_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "<|endoftext|>": 1, "alpha": 2, "beta": 3, "gamma": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "a.jsonl").write_text('{"body": "alpha beta"}\n\n{"body": ["gamma", "delta"]}\n"beta"\n')
    (tmp_path / "b.txt").write_text("gamma gamma alpha")
    assert main(["prepare-data", str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt"), "--jsonl-key", "body",
                 "--tokenizer", str(tmp_path / "tok.json"), "--out", str(tmp_path / "o"), "--quiet"]) == 0
    ds = MMapDataset(tmp_path / "o")
    assert [ds[i].tolist() for i in range(len(ds))] == [[2, 3, 1], [4, 0, 1], [3, 1], [4, 4, 2, 1]]
    assert list(read_documents(tmp_path / "a.jsonl", "body")) == ["alpha beta", "gamma\n\ndelta", "beta"]


def test_errors_and_dry_run(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"[UNK]": 0, "x": 1}, unk_token="[UNK]")).save(str(tmp_path / "noeod.json"))
    (tmp_path / "a.jsonl").write_text('{"txt": "x"}\n')
    (tmp_path / "bad.jsonl").write_text("not json\n")
    assert main(["prepare-data", str(tmp_path / "a.jsonl"), "--tokenizer", str(tmp_path / "noeod.json"),
                 "--out", str(tmp_path / "o"), "--jsonl-key", "txt"]) == 2
    assert "has no end-of-document token (none of <|endoftext|>, </s>" in capsys.readouterr().err
    assert main(["prepare-data", str(tmp_path / "a.jsonl"), "--tokenizer", str(tmp_path / "noeod.json"),
                 "--out", str(tmp_path / "o"), "--jsonl-key", "txt", "--eod-token", "</s>"]) == 2
    assert "has no token '</s>' (--eod-token)" in capsys.readouterr().err
    assert main(["prepare-data", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "no key 'text'" in capsys.readouterr().err
    assert main(["prepare-data", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:1: not valid JSON" in capsys.readouterr().err
    assert main(["prepare-data", "--out", str(tmp_path / "o")]) == 2
    assert "no input" in capsys.readouterr().err
    assert main(["prepare-data", "--stdlib-corpus", "5000", "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "o.tokenizer.model" in capsys.readouterr().out
    assert not any(tmp_path.glob("o*"))
    with pytest.raises(UserError, match="too small"):
        from neox_progressive.data import train_sentencepiece
        train_sentencepiece(["tiny text"], 5000, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()
    from neox_progressive.tokenizer import file_tokenizer
    assert file_tokenizer(tmp_path / "noeod.json").eod is None


def test_existing_outputs_need_force(tmp_path, capsys):
    args = ["prepare-data", "--stdlib-corpus", "8000", "--vocab-size", "300", "--out", str(tmp_path / "d"), "--quiet"]
    assert main(args) == 2 and "pass --vocab-size 3" in capsys.readouterr().err
    args[4] = "400"
    assert main(args) == 0
    before = (tmp_path / "d.bin").read_bytes()
    assert main(args) == 2 and "--force" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0
    assert (tmp_path / "d.bin").read_bytes() == before          # deterministic: the trained tokenizer too
