"""A family whose first member starts from a Hugging Face model (`init: {hf: DIR}`): parsed and checked, shown by
`plan` with Eq. 4 unchanged (its scratch cost counted as spent: our choice), and run by the builtin engine: the
member's checkpoint is the import (transformers' logits) or is trained from it, and the next member grows from it."""

from __future__ import annotations

import pytest
import torch
import yaml
from hf_import_util import hf_logits, ours, rel_err, save
from runner_util import FAST, prepare_tiny_data, write_family

from neox_progressive.cli import main
from neox_progressive.errors import UserError
from neox_progressive.family import load_family, member_dirs, plan_family
from neox_progressive.family.budget import token_budgets
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.runner.state import RunState

transformers = pytest.importorskip("transformers")
TWO = [{"name": "s", "hidden_size": 32, "ffn_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
        "global_batch": 8},
       {"name": "m", "hidden_size": 48, "ffn_size": 96, "num_layers": 3, "num_heads": 6, "num_kv_heads": 3,
        "global_batch": 8}]


def hf_member(path, seed=0):
    """A LlamaForCausalLM of the tiny family's first member's shape (vocab 512, seq 64, eps 1e-5)."""
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                                   max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in n else p.normal_(0, 0.1)
    return model, save(model, path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return hf_member(tmp_path_factory.mktemp("hf") / "s")


def family(tmp_path, data, hf_dir, train=False, **over):
    members = [dict(TWO[0], init={"hf": str(hf_dir), "train": train}), TWO[1]]
    return write_family(tmp_path / "family.yml", data, tmp_path / "out", **{**FAST, "members": members, **over})


def test_parsed_and_planned_with_the_papers_budgets(tmp_path, data, hf, capsys):
    fam = load_family(family(tmp_path, data, hf[1]))
    assert fam.members[0].init_hf == str(hf[1]) and not fam.members[0].init_train
    plain = load_family(write_family(tmp_path / "plain.yml", data, tmp_path / "out", **{**FAST, "members": TWO}))
    assert token_budgets(fam, "progressive") == token_budgets(plain, "progressive")  # Eq. 4 unchanged
    assert plan_family(fam).rows[0].init == {"hf": str(hf[1]), "train": False}
    assert main(["plan", str(fam.path)]) == 0
    out = capsys.readouterr().out
    assert "| s (from HF) |" in out and "counts its scratch cost as spent" in out and "not trained" in out


def test_init_only_on_the_first_member_and_known_keys(tmp_path, data, hf):
    bad = [TWO[0], dict(TWO[1], init={"hf": str(hf[1])})]
    with pytest.raises(UserError, match=r"members\[1\].init: only the first member"):
        load_family(write_family(tmp_path / "f.yml", data, tmp_path / "out", members=bad))
    with pytest.raises(UserError, match="steps"):
        load_family(write_family(tmp_path / "g.yml", data, tmp_path / "out",
                                 members=[dict(TWO[0], init={"hf": str(hf[1]), "steps": 3}), TWO[1]]))


@pytest.mark.slow
def test_run_imports_the_first_member_and_grows_the_next_from_it(tmp_path, data, hf):
    model, hf_dir = hf
    fam_path = family(tmp_path, data, hf_dir)
    assert main(["run", str(fam_path), "--engine", "builtin", "--device", "cpu", "--quiet", "--no-eval"]) == 0
    fam = load_family(fam_path)
    state = RunState(fam.output_dir / "progressive" / "state.json")
    assert state.info("s/train")["imported_from"] == str(hf_dir) and state.done("m/train")
    stage = fam.output_dir / "progressive" / "configs" / "stage_s.yml"
    assert "load" not in yaml.safe_load(stage.read_text())
    reader = CheckpointReader(member_dirs(fam, "progressive", "s").checkpoints, fam.members[0].shape())
    x = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    assert rel_err(ours(reader.shape, reader.state_dict(), x), hf_logits(model, x)) <= 1e-5
    assert (member_dirs(fam, "progressive", "m").expanded / "expansion.json").is_file()
    # a rerun skips everything (the import's inputs and outputs are verified like any step's)
    assert main(["run", str(fam_path), "--engine", "builtin", "--device", "cpu", "--quiet", "--no-eval"]) == 0


@pytest.mark.slow
def test_train_true_trains_the_first_member_from_the_import(tmp_path, data, hf):
    fam_path = family(tmp_path, data, hf[1], train=True)
    assert main(["run", str(fam_path), "--engine", "builtin", "--device", "cpu", "--quiet", "--no-eval",
                 "--mode", "both"]) == 0
    fam = load_family(fam_path)
    # the independent family's first member is the same model (same import, budget, data, schedule): not trained again
    indep = RunState(fam.output_dir / "independent" / "state.json")
    assert indep.info("s/train")["reused_from"] == "progressive" and not indep.done("s/import")
    assert not member_dirs(fam, "independent", "s").expanded.exists() and indep.done("m/train")
    state = RunState(fam.output_dir / "progressive" / "state.json")
    info = state.info("s/train")
    assert state.done("s/import") and "imported_from" not in info and info["start_check"]
    stage = yaml.safe_load((fam.output_dir / "progressive" / "configs" / "stage_s.yml").read_text())
    assert stage["finetune"] is True and stage["load"] == str(member_dirs(fam, "progressive", "s").expanded)
    # training started from the import: the stage's iteration-0 validation loss is the import's
    from neox_progressive.train import expanded_loss

    stage_yml = fam.output_dir / "progressive" / "configs" / "stage_s.yml"
    start = expanded_loss(member_dirs(fam, "progressive", "s").expanded, [stage_yml], n_batches=2, device="cpu")
    assert info["start_valid_loss"] == pytest.approx(start, abs=1e-6)
    assert info["final_valid_loss"] < start - 0.5
