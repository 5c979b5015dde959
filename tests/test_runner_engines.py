"""The NeoX engine's process handling, with a stand-in for GPT-NeoX (a deepy.py that prints NeoX's training
lines): the log is captured, training losses reach the callback as they are printed, and a callback that
stops the stage (the live stage-start check) ends NeoX's whole process group at once."""

from __future__ import annotations

import math
import os
import textwrap

import pytest
import yaml

from neox_progressive.errors import CheckFailed, UserError
from neox_progressive.runner.engines import NeoXEngine
from neox_progressive.runner.family_run import _LiveStartCheck

FAKE_DEEPY = textwrap.dedent('''
    import os, sys, time, yaml
    cfg = yaml.safe_load(open(sys.argv[-1]))
    open(os.environ["FAKE_PID_FILE"], "w").write(str(os.getpid()))
    losses = [float(x) for x in os.environ["FAKE_LOSSES"].split(",")]
    for i, loss in enumerate(losses, 1):
        open(os.environ["FAKE_PID_FILE"] + ".iter", "w").write(str(i))
        print(f" samples/sec: 1.0 | iteration {i:8d}/{len(losses):8d} | elapsed time per iteration (ms): 1.0 | "
              f"learning rate: 1.000E-04 | lm_loss: {loss:.6E} | loss scale: 1.0 |", flush=True)
        time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    save = cfg["save"]
    os.makedirs(f"{save}/global_step{len(losses)}", exist_ok=True)
    open(f"{save}/latest", "w").write(f"global_step{len(losses)}")
''')


@pytest.fixture
def fake_neox(tmp_path):
    d = tmp_path / "neox"
    d.mkdir()
    (d / "deepy.py").write_text(FAKE_DEEPY)
    (d / "train.py").write_text("")
    stage = tmp_path / "stage_m.yml"
    stage.write_text(yaml.safe_dump({"save": str(tmp_path / "ck"), "train_iters": 6}))
    return d, stage


def _engine(d, tmp_path, losses, sleep=0.0):
    env = {"FAKE_LOSSES": ",".join(map(str, losses)), "FAKE_SLEEP": str(sleep), "FAKE_PID_FILE": str(tmp_path / "pid")}
    return NeoXEngine(d, env=env)


def test_log_captured_and_losses_reach_the_callback(fake_neox, tmp_path):
    d, stage = fake_neox
    seen = []
    res = _engine(d, tmp_path, [4.0, 3.9, 3.8, 3.7, 3.6, 3.5]).train(stage, tmp_path / "logs", quiet=True,
                                                                    callback=seen.append)
    assert [r["iteration"] for r in seen] == [1, 2, 3, 4, 5, 6] and seen[0]["loss"] == pytest.approx(4.0)
    assert res.checkpoint == tmp_path / "ck" and "lm_loss: 3.500000E+00" in res.log.read_text()
    again = _engine(d, tmp_path, [9.0] * 6).train(stage, tmp_path / "logs", quiet=True)  # done: NeoX not started again
    assert again.log == res.log and "9.000000E+00" not in res.log.read_text()


def test_a_failing_live_start_check_stops_neox_at_once(fake_neox, tmp_path):
    d, stage = fake_neox
    stage.write_text(yaml.safe_dump({"save": str(tmp_path / "ck"), "train_iters": 60}))
    vocab = 512
    # the master-weight trap: the first loss is the expanded checkpoint's, then a random init's
    losses = [3.5] + [math.log(vocab)] * 59
    check = _LiveStartCheck("m", expanded=3.5, vocab=vocab, quiet=True)
    with pytest.raises(CheckFailed, match="threw the expansion away"):
        _engine(d, tmp_path, losses, sleep=0.5).train(stage, tmp_path / "logs", quiet=True, callback=check.callback)
    assert len(check.losses) == check.n_first  # judged on the first 5 logged losses
    # NeoX was stopped there, not left to run its 60 iterations (a fixed slack for the lines already in the pipe)
    assert int((tmp_path / "pid.iter").read_text()) <= check.n_first + 2
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not (tmp_path / "ck" / "latest").exists()


def test_neox_failure_names_the_log(fake_neox, tmp_path):
    d, stage = fake_neox
    (d / "deepy.py").write_text("import sys; print('Traceback: boom', flush=True); sys.exit(3)")
    with pytest.raises(UserError, match=r"exit status 3; see .*stage_m\.neox\.log"):
        _engine(d, tmp_path, [1.0]).train(stage, tmp_path / "logs", quiet=True)
