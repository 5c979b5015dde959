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


# ---- judged on the median, worded for the engine, threshold stated, a warning band (issue 14) ----------------------
LN512 = math.log(512)  # a random init's loss for V = 512


def test_one_spike_is_not_a_lost_expansion():
    # a short budget's first losses as the builtin engine logged them: one spike at step 2
    check = check_stage_start(4.9, [4.889, 6.835, 4.948], V, member="m", engine="builtin")
    assert check.ok and check.verdict == "expanded" and not check.warning, check.message


def test_the_threshold_is_stated_and_a_rise_below_it_warns():
    # the demo's member m: first losses 3.98-4.08 against 3.43 expanded
    check = check_stage_start(3.43, [3.98, 4.05, 4.08, 4.02, 4.01], V, member="m")
    threshold, warn = (3.43 + LN512) / 2, 3.43 + (LN512 - 3.43) / 8  # 4.834, 3.781
    assert check.ok and check.warning and check.verdict == "expanded"
    assert check.threshold == pytest.approx(threshold) and check.warn_above == pytest.approx(warn)
    assert check.message.startswith("member m: warning:")
    assert f"warning above {warn:.3f}, failing above {threshold:.3f}" in check.message and f"{LN512:.3f}" in check.message
    calm = check_stage_start(3.43, [3.45, 3.40, 3.52], V)
    assert calm.ok and not calm.warning and f"threshold {threshold:.3f}" in calm.message


def test_the_cause_is_worded_for_the_engine():
    trap = [3.45] + [LN512 - 0.1] * 4
    neox = check_stage_start(3.43, trap, V, engine="neox")
    builtin = check_stage_start(3.43, trap, V, engine="builtin")
    assert not neox.ok and not builtin.ok and neox.verdict == builtin.verdict == "master_weight_trap"
    assert "DeeperSpeed" in neox.message and "builtin engine" in neox.message  # the advice: another engine
    assert "DeepSpeed" not in builtin.message and "keeps no separate master weights" in builtin.message
    assert "learning rate" in builtin.message
    cold = check_stage_start(3.43, [LN512] * 5, V, engine="builtin")
    assert cold.verdict == "not_loaded" and "The builtin engine did not start from the expanded checkpoint" in cold.message
    assert f"threshold {(3.43 + LN512) / 2:.3f}" in cold.message


def test_two_losses_judge_on_the_worse():
    # an even count: the higher middle value, so [fine, random] fails rather than passes
    assert not check_stage_start(3.43, [3.45, LN512], V).ok


def test_the_live_check_words_for_its_engine():
    from neox_progressive.runner.family_run import _LiveStartCheck

    check = _LiveStartCheck("m", expanded=3.43, vocab=V, quiet=True, engine="builtin")
    with pytest.raises(CheckFailed, match="keeps no separate master weights"):
        for i, loss in enumerate([3.45] + [LN512] * 4, 1):
            check.callback({"kind": "train", "iteration": i, "loss": loss})
