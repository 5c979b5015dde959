"""Stage-start check: an expanded start passes; a start that was not loaded, or that lost the
expansion after its first step (the fp32 master-weight trap), fails with a message explaining it."""

import math

import pytest
from train_util import make_data, stage_config, write_stage

from neox_progressive.errors import CheckFailed
from neox_progressive.train import (
    check_stage_start,
    expanded_loss,
    parse_neox_losses,
    read_metrics,
    require_expanded_start,
    train_stage,
)

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


def test_parse_neox_losses():
    # lines as megatron/logging.py training_log prints them
    log = "\n".join([
        " samples/sec: 22.599 | iteration        1/     200 | elapsed time per iteration (ms): 88.5 | learning rate: "
        "1.000E-04 | approx flops per GPU: 177.7MFLOPS | lm_loss: 5.291257E+00 | number of skipped iterations:   0 |",
        " validation results at iteration 2 | lm_loss value: 5.100000E+00 | lm_loss_ppl value: 1.6E+02 |",
        " samples/sec: 23.000 | iteration        2/     200 | elapsed time per iteration (ms): 80.0 | learning rate: "
        "2.000E-04 | lm_loss: 1.034000E+01 | number of skipped iterations:   0 |",
    ])
    assert parse_neox_losses(log) == [(1, 5.291257), (2, 10.34)]
