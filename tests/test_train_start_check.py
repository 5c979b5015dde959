"""Stage-start check: an expanded start passes; a start that was not loaded, or that lost the
expansion after its first step (the fp32 master-weight trap), fails with a message explaining it."""

import math

import pytest
from train_util import make_data, stage_config, write_stage

from neox_progressive.errors import CheckFailed
from neox_progressive.train import check_stage_start, expanded_loss, read_metrics, require_expanded_start, train_stage

V = 512


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("check")
    data = make_data(root / "d")
    first = train_stage(write_stage(root / "a.yml", stage_config(data, root / "a", train_iters=60)), device="cpu", quiet=True)
    fine = write_stage(root / "b.yml", stage_config(data, root / "b", train_iters=5, load=str(first.save_dir), finetune=True))
    scratch = write_stage(root / "c.yml", stage_config(data, root / "c", train_iters=5, seed=8))
    return first, train_stage(fine, device="cpu", quiet=True), train_stage(scratch, device="cpu", quiet=True), fine


def first_losses(res, n=5):
    return [r["loss"] for r in read_metrics(res.metrics_path, "train")[:n]]


def test_a_real_finetune_start_passes(runs):
    first, fine, _, cfg = runs
    e = expanded_loss(first.save_dir, cfg, n_batches=2, device="cpu")
    assert e < math.log(V) - 1
    check = require_expanded_start(e, first_losses(fine), V, member="2")
    assert check.ok and check.verdict == "expanded" and "member 2" in check.message


def test_a_random_start_is_caught(runs):
    first, _, scratch, cfg = runs
    e = expanded_loss(first.save_dir, cfg, n_batches=2, device="cpu")
    check = check_stage_start(e, first_losses(scratch), V)
    assert not check.ok and check.verdict == "not_loaded"
    assert "Unable to load checkpoint" in check.message and "latest" in check.message
    with pytest.raises(CheckFailed, match="near a random init"):
        require_expanded_start(e, first_losses(scratch), V)


def test_the_master_weight_trap_is_caught(runs):
    # what NeoX logs in the trap: step 1 is scored with the loaded weights, then the random fp32
    # master weights come back; spliced here from the two real runs
    first, fine, scratch, cfg = runs
    e = expanded_loss(first.save_dir, cfg, n_batches=2, device="cpu")
    losses = first_losses(fine, 1) + first_losses(scratch)[1:]
    check = check_stage_start(e, losses, V, member="3")
    assert not check.ok and check.verdict == "master_weight_trap"
    assert "fp32 master weights" in check.message and "DeeperSpeed" in check.message


def test_inconclusive_when_the_checkpoint_is_itself_random():
    check = check_stage_start(math.log(V) - 0.1, [math.log(V)] * 3, V)
    assert check.ok and check.verdict == "inconclusive"
