"""prepare-data --family: the family's data from its data.prepare block, then every member's window cut."""

from __future__ import annotations

import pytest
from family_util import tiny_family, write_family

from neox_progressive.cli import main
from neox_progressive.data import MMapDataset
from neox_progressive.family import load_family, plan_family


def test_prepare_data_for_a_family(tmp_path, capsys):
    data = tiny_family()
    data["budget"] = {"tokens_per_param": 0.25}
    data["training"]["lr"]["warmup"] = 0.1
    data["data"] = {"train": "d/train", "valid": "d/valid", "prepare": {"stdlib_corpus": 250_000, "valid_fraction": 0.1}}
    data["shared"] = {"tokenizer_type": "SPMTokenizer", "vocab_file": "d/train.tokenizer.model"}
    path = write_family(tmp_path, data)
    assert main(["prepare-data", "--family", str(path), "--mode", "both", "--quiet"]) == 0
    fam = load_family(path)
    src = MMapDataset(fam.data.train)
    stream = [int(t) for i in range(len(src.sizes)) for t in src[i]]
    for mode in ("progressive", "independent"):
        for row in plan_family(fam, mode).rows:
            cut = MMapDataset(row.train_data_path)
            got = [int(t) for i in range(len(cut.sizes)) for t in cut[i]]
            assert got == [t for a, b in row.data_windows for t in stream[a:b]]
    assert (tmp_path / "d" / "train.tokenizer.model").is_file()  # where the family's shared.vocab_file points
    assert (tmp_path / "d" / "valid.idx").is_file()
    capsys.readouterr()
    assert main(["prepare-data", "--family", str(path)]) == 0  # again: nothing to prepare, windows already cut
    assert "using the existing" in capsys.readouterr().out
    assert main(["prepare-data", "--family", str(path), "--out", "x"]) == 2
    del data["data"]["prepare"]
    data["data"]["train"] = "elsewhere/train"
    assert main(["prepare-data", "--family", str(write_family(tmp_path, data, "f2.yml"))]) == 2
    assert "data.prepare names no source" in capsys.readouterr().err


def test_prepare_data_needs_out_without_family(capsys):
    with pytest.raises(SystemExit):
        main(["prepare-data", "--help"])
    capsys.readouterr()
    assert main(["prepare-data", "--stdlib-corpus", "1000"]) == 2
    assert "--out" in capsys.readouterr().err
