"""The tiny family's generated stage YAML trains with the builtin engine, as planned."""

from __future__ import annotations

import json

from family_util import CONFIGS
from train_util import make_data

from neox_progressive.data import cut_member_windows
from neox_progressive.family import generate_configs, load_family, member_dirs, plan_family
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.train import read_settings, train_stage


def test_tiny_family_first_stage_trains(tmp_path):
    data = make_data(tmp_path / "data", n_chars=150_000, vocab=512)
    fam = load_family(CONFIGS / "tiny_family.yml", {
        "output_dir": str(tmp_path / "runs"), "data": {"train": data["train"], "valid": data["valid"]},
        "shared": {"vocab_file": data["tokenizer"]}, "budget": {"tokens_per_param": 0.5}})
    paths = generate_configs(fam, tmp_path / "cfg", plot=False)
    plan = plan_family(fam)
    first = plan.rows[0]
    cut_member_windows(fam.data.train, [first.__dict__])
    stage = tmp_path / "cfg" / "stage_s.yml"
    assert stage in paths
    settings = read_settings([stage])
    member = fam.members[0]
    assert settings.shape == member.shape().replace(params_dtype="float32")  # padded vocab from the real tokenizer too
    assert settings.train_iters == first.train_iters and settings.global_batch == member.global_batch
    assert settings.optimizer["lr"] == first.max_lr
    result = train_stage([stage], device="cpu", quiet=True)
    assert result.completed and result.iterations == first.train_iters
    assert result.tokens == first.realized_tokens
    assert result.final_valid_loss < result.start_valid_loss - 1.0
    assert result.save_dir == member_dirs(fam, "progressive", "s").checkpoints
    assert CheckpointReader(result.save_dir, member.shape()).iteration == first.train_iters
    plan_file = json.loads((tmp_path / "cfg" / "family_plan.json").read_text())
    assert plan_file["members"][0]["train_data_path"] == first.train_data_path
