"""The engine as a process: killed with SIGKILL in the middle of training and run again, it ends with
the same checkpoint as a run that was never stopped; and it logs to W&B offline under the exact group."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_util import checksums, make_data, stage_config, write_stage

from neox_progressive.train import read_metrics, train_stage

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


def start(cfg: Path) -> subprocess.Popen:
    # the same thread count as this process: CPU matmuls are bit-reproducible only at equal thread counts
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.Popen([sys.executable, "-m", "neox_progressive.train", str(cfg), "--quiet", "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_sigkill_then_rerun_gives_the_same_checkpoint(data, tmp_path):
    over = dict(train_iters=300, checkpoint_factor=25, eval_interval=50, log_interval=10)
    ref = train_stage(write_stage(tmp_path / "ref.yml", stage_config(data, tmp_path / "ref", **over)), device="cpu",
                      quiet=True)
    cfg = write_stage(tmp_path / "run.yml", stage_config(data, tmp_path / "run", **over))
    proc = start(cfg)
    latest = tmp_path / "run" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text() not in ("", "global_step25"):
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed; make it longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = latest.read_text()
    assert killed_at != "global_step300"
    done = start(cfg)
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, err.decode()[-2000:]
    assert checksums(tmp_path / "run" / "global_step300") == checksums(ref.checkpoint)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in recs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "run" / "metrics.jsonl")) == strip(read_metrics(ref.metrics_path))
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]   # no staging leftovers


def test_wandb_offline_group_is_exact(data, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    seen = {}
    real_init = wandb.init

    def spy(**kwargs):
        run = real_init(**kwargs)
        seen.update(group=run.group, name=run.name, project=run.project, kwargs=kwargs)
        return run

    monkeypatch.setattr(wandb, "init", spy)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = stage_config(data, tmp_path / "ck", train_iters=2, checkpoint_factor=2, use_wandb=True,
                       wandb_project="fam", wandb_group="family-demo", wandb_run_name="member-1", log_dir=str(tmp_path / "logs"))
    res = train_stage(write_stage(tmp_path / "s.yml", cfg), device="cpu", quiet=True)
    assert res.completed
    assert seen["group"] == "family-demo" and seen["name"] == "member-1" and seen["kwargs"]["group"] == "family-demo"
    assert list((tmp_path / "logs" / "wandb").glob("offline-run-*"))
