"""`neox-progressive run` on the tiny family with the builtin engine: end to end, stage-start from the
expanded weights, skipping what is done, and SIGKILL during expansion and during training followed by
a rerun giving the same final checkpoints as an uninterrupted run."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path

import pytest
import yaml
from runner_util import FAST, cli_process, prepare_tiny_data, write_family
from train_util import checksums

from neox_progressive.cli import main
from neox_progressive.commands.demo import FAMILY_FILE
from neox_progressive.family import load_family, member_dirs
from neox_progressive.runner.state import RunState
from neox_progressive.train import expanded_loss, read_metrics, read_settings

MEMBERS = ["s", "m", "l"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare_tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """The tiny family trained progressively once (uninterrupted): (family file, family)."""
    root = tmp_path_factory.mktemp("ref")
    fam = write_family(root / "family.yml", data, root / "out", **FAST)
    assert main(["run", str(fam), "--engine", "builtin", "--device", "cpu", "--quiet", "--no-eval"]) == 0
    return fam, load_family(fam)


def final_checksums(family, mode: str = "progressive") -> dict[str, dict[str, str]]:
    out = {}
    for name in MEMBERS:
        save = member_dirs(family, mode, name).checkpoints
        out[name] = checksums(save / (save / "latest").read_text().strip())
    return out


def stage_yaml(family, name: str, mode: str = "progressive") -> Path:
    return Path(family.output_dir) / mode / "configs" / f"stage_{name}.yml"


@pytest.mark.slow
def test_every_stage_checkpoint_passes_inspect(trained, capsys):
    _, family = trained
    for name in MEMBERS:
        save = member_dirs(family, "progressive", name).checkpoints
        assert main(["inspect", str(save), "--config", str(stage_yaml(family, name)), "--quiet"]) == 0
    assert "layers" in capsys.readouterr().out


@pytest.mark.slow
def test_later_stages_start_from_the_expanded_weights(trained):
    _, family = trained
    logs = Path(family.output_dir) / "progressive" / "logs"
    first = read_metrics(logs / "stage_s.metrics.jsonl", "valid")[0]["loss"]   # a random init's loss
    assert abs(first - math.log(512)) < 0.5
    for name in MEMBERS[1:]:
        yml = stage_yaml(family, name)
        # the expanded checkpoint's loss, computed here by the reference model from the files on disk
        st = read_settings([yml])
        exp = expanded_loss(member_dirs(family, "progressive", name).expanded, [yml], device="cpu",
                            n_batches=st.eval_iters * st.grad_acc)
        valid = read_metrics(logs / f"stage_{name}.metrics.jsonl", "valid")
        train = read_metrics(logs / f"stage_{name}.metrics.jsonl", "train")
        # the same computation on the same batches (test_train_engine.py checks the same identity at 1e-6)
        assert valid[0]["iteration"] == 0 and valid[0]["loss"] == pytest.approx(exp, abs=1e-6), (valid[0], exp)
        assert abs(train[0]["loss"] - exp) < 0.5 and first - train[0]["loss"] > 1.5, (train[0], exp, first)
        info = RunState(Path(family.output_dir) / "progressive" / "state.json").info(f"{name}/train")
        assert info["start_check"]["verdict"] == "expanded"


@pytest.mark.slow
def test_rerun_skips_verified_steps_and_redoes_changed_ones(trained, capsys):
    fam, family = trained
    before = final_checksums(family)
    assert main(["run", str(fam), "--engine", "builtin", "--device", "cpu", "--no-eval"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipping") == 5, err   # s, m, l train + m, l expand
    assert final_checksums(family) == before
    # a changed expansion seed: the first member stays done, everything from the first expansion on is redone
    changed = write_family(fam.with_name("changed.yml"), {"train": str(family.data.train), "valid": str(family.data.valid),
                                                          "tokenizer": family.shared["vocab_file"]},
                           family.output_dir, **FAST, expansion={"seed": 1})
    assert main(["run", str(changed), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "s/train: train s (from scratch)  (done, will be skipped)" in out
    assert "m/expand: expand s -> m\n" in out and "(done" not in out.split("m/expand")[1]


def test_a_renamed_family_file_retrains_nothing_and_the_dry_run_agrees(trained, capsys):
    # the file's name is in every stage YAML's header comment: a comment must not invalidate the checkpoints
    fam, family = trained
    before = final_checksums(family)
    renamed = fam.with_name("renamed_family.yml")
    renamed.write_text("# renamed, with a new comment\n" + fam.read_text())
    assert main(["run", str(renamed), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("(done, will be skipped)") == 5, out
    assert main(["run", str(renamed), "--engine", "builtin", "--device", "cpu", "--no-eval"]) == 0
    err = capsys.readouterr().err
    assert err.count("done before, outputs verified; skipping") == 5, err
    assert "generate-configs renamed_family.yml" in stage_yaml(family, "m").read_text()
    assert final_checksums(family) == before
    # a value only the stage YAMLs carry: the dry run judges the configs the run would write, not those on disk
    data = {"train": str(family.data.train), "valid": str(family.data.valid), "tokenizer": family.shared["vocab_file"]}
    other = write_family(fam.with_name("other_wd.yml"), data, family.output_dir,
                         **{**FAST, "training": {**FAST["training"], "weight_decay": 0.02}})
    assert main(["run", str(other), "--dry-run"]) == 0
    assert "(done, will be skipped)" not in capsys.readouterr().out

def test_dry_run_prints_steps_and_commands_and_writes_nothing(data, tmp_path, capsys):
    fam = write_family(tmp_path / "family.yml", data, tmp_path / "out", **FAST)
    assert main(["run", str(fam), "--dry-run", "--mode", "both"]) == 0
    out = capsys.readouterr().out
    for line in ("[progressive] m/expand: expand s -> m", "[progressive] l/train: train l (from the expanded l)",
                 "[independent] l/train: train l (from scratch)", "$ neox-progressive expand --src"):
        assert line in out, out
    assert "[independent] m/expand" not in out
    # the first member, the same model in both families, is trained once: the independent family reuses it
    assert "[independent] s/train: reuse progressive s (the same model" in out and "[independent] s/train: train" not in out
    assert not (tmp_path / "out").exists()
    assert main(["run", str(fam), "--dry-run", "--mode", "both", "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)  # the same listing as data
    steps = {r["mode"]: {s["step"]: s for s in r["steps"]} for r in plan["runs"]}
    assert plan["dry_run"] and set(steps) == {"progressive", "independent"}
    assert steps["progressive"]["m/expand"]["command"].startswith("neox-progressive expand --src")
    assert "m/expand" not in steps["independent"] and not any(s["done"] for r in steps.values() for s in r.values())
    assert steps["independent"]["s/train"]["does"].startswith("reuse progressive s (the same model")
    assert not (tmp_path / "out").exists()
    neox = tmp_path / "neox"
    neox.mkdir()
    (neox / "deepy.py").write_text("")
    assert main(["run", str(fam), "--dry-run", "--engine", "neox", "--neox-dir", str(neox)]) == 0
    assert f"deepy.py {neox}/train.py " in capsys.readouterr().out


def test_bad_engine_arguments(data, tmp_path, capsys):
    fam = write_family(tmp_path / "family.yml", data, tmp_path / "out", **FAST)
    assert main(["run", str(fam), "--engine", "neox"]) == 2
    assert "--neox-dir" in capsys.readouterr().err
    assert main(["run", str(fam), "--engine", "neox", "--neox-dir", str(tmp_path)]) == 2
    assert "not a GPT-NeoX checkout" in capsys.readouterr().err


SLOW_EXPAND = """
import time
import neox_progressive.expand.run as R
class _Slow(R.CheckpointWriter):
    def write_layer(self, *a, **k):
        print('EXPAND-WRITING-LAYER', flush=True)
        time.sleep(0.4)
        return super().write_layer(*a, **k)
R.CheckpointWriter = _Slow
"""


def _run_until(proc, *markers: str, timeout: float = 240) -> list[str]:
    """Read the process's output until the markers have appeared in this order, then SIGKILL it."""
    seen, todo = [], list(markers)
    deadline = time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if todo[0] in line:
            todo.pop(0)
        if not todo or time.time() > deadline:
            break
    assert proc.poll() is None, "the run ended before it could be killed:\n" + "".join(seen[-20:])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return seen


@pytest.mark.slow
def test_sigkill_during_expansion_and_training_then_rerun_gives_the_same_family(trained, data, tmp_path):
    _, ref_family = trained
    fam = write_family(tmp_path / "family.yml", data, tmp_path / "out", **FAST)
    family = load_family(fam)
    args = ("run", str(fam), "--engine", "builtin", "--device", "cpu", "--no-eval")
    # 1. killed while the expansion s -> m writes its layers
    _run_until(cli_process(*args, extra_code=SLOW_EXPAND), "EXPAND-WRITING-LAYER")
    expanded = member_dirs(family, "progressive", "m").expanded
    assert not (expanded / "latest").exists()
    assert not any(p.name.startswith("m") or p == expanded for p in expanded.parent.iterdir() if (p / "latest").exists())
    # 2. killed while training l, after a few iterations
    _run_until(cli_process(*args), "[progressive] train l", "iteration      15", timeout=300)
    state = RunState(tmp_path / "out" / "progressive" / "state.json")
    assert state.done("m/train") and not state.done("l/train")
    # 3. to the end
    proc = cli_process(*args)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "l/train: done before" not in out and "s/train: done before" in out
    assert final_checksums(family) == final_checksums(ref_family)
    assert json.loads((tmp_path / "out" / "progressive" / "state.json").read_text())["steps"].keys() == {
        "s/train", "m/expand", "m/train", "l/expand", "l/train"}


@pytest.mark.slow
def test_run_evaluates_the_family_and_eval_reads_the_family_file(trained, tmp_path, capsys):
    fam, family = trained
    assert main(["run", str(fam), "--engine", "builtin", "--device", "cpu", "--quiet"]) == 0
    report = json.loads((Path(family.output_dir) / "report" / "report.json").read_text())
    members = report["families"]["progressive"]["members"]
    assert [m["name"] for m in members] == MEMBERS and len(report["families"]["progressive"]["pairs"]) == 2
    assert all(m["perplexity"]["loss"] > 0 for m in members)
    assert main(["run", str(fam), "--engine", "builtin", "--device", "cpu"]) == 0
    assert "eval: done before" in capsys.readouterr().err
    # `eval FAMILY.yml` finds the trained members and the family's held-out data by itself
    assert main(["eval", str(fam), "--out", str(tmp_path / "ev"), "--skip", "specdec", "--ppl-windows", "4",
                 "--kl-examples", "4", "--quiet", "--device", "cpu"]) == 0
    again = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert [m["name"] for m in again["families"]["progressive"]["members"]] == MEMBERS
    assert again["settings"]["data"] == str(family.data.valid)


def test_wandb_every_stage_logs_into_the_configured_group(data, tmp_path, monkeypatch):
    """One W&B group named exactly as configured for all stages of a run, one run per member; the builtin
    engine passes it to wandb.init unchanged (offline: no network)."""
    from neox_progressive.family import generate_configs
    from neox_progressive.train import read_settings, train_stage

    fam = write_family(tmp_path / "family.yml", data, tmp_path / "out", **FAST,
                       wandb={"enabled": True, "project": "proj", "group": "tiny-family-7"})
    family = load_family(fam)
    stages = [p for p in generate_configs(family, tmp_path / "cfg", "progressive", plot=False) if p.name.startswith("stage_")]
    settings = [read_settings([p]).wandb for p in stages]
    assert [w["group"] for w in settings] == ["tiny-family-7"] * 3
    assert len({w["name"] for w in settings}) == 3
    seen = {}

    class FakeRun:
        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    import wandb

    def fake_init(**kw):
        seen.update(kw)
        return FakeRun()

    monkeypatch.setattr(wandb, "init", fake_init)
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = yaml.safe_load(stages[0].read_text())
    cfg.update(train_iters=2, eval_interval=0, train_data_paths=[data["train"]])
    (tmp_path / "one.yml").write_text(yaml.safe_dump(cfg))
    train_stage([tmp_path / "one.yml"], device="cpu", quiet=True)
    assert seen["group"] == "tiny-family-7" and seen["project"] == "proj" and seen["name"] == settings[0]["name"]


def test_a_pair_the_expansion_cannot_grow_stops_before_training(data, tmp_path, capsys):
    raw = yaml.safe_load(FAMILY_FILE.read_text())
    members = raw["members"]
    members[2] = {**members[2], "num_heads": 16, "num_kv_heads": 8}   # head_dim 8 (m) -> 4 (l)
    fam = write_family(tmp_path / "family.yml", data, tmp_path / "out", **FAST, members=members)
    assert main(["run", str(fam), "--engine", "builtin", "--device", "cpu", "--no-eval", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "member l cannot be expanded from m" in err and "head_dim" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_mode_both_trains_the_first_member_once(trained, capsys):
    """The first member is the same model in both families (same budget, window and schedule): --mode both trains it
    once, the independent family reuses it, its state file records the progressive checkpoint, the summary says so.
    (On the module's progressively trained family: its progressive steps are all done, so only m and l train here.)"""
    from neox_progressive.family import plan_family

    fam, family = trained
    args = ["run", str(fam), "--mode", "both", "--engine", "builtin", "--device", "cpu", "--no-eval"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "[independent] reuse progressive s (the same model" in captured.err
    assert "| independent | s (= progressive s) |" in captured.out
    assert "independent s is the progressive family's s, trained once" in captured.out
    prog = member_dirs(family, "progressive", "s").checkpoints
    assert not member_dirs(family, "independent", "s").root.exists()        # nothing trained for it
    for name in ("m", "l"):                                                  # the others from scratch, in their dirs
        assert (member_dirs(family, "independent", name).checkpoints / "latest").is_file()
    state = RunState(Path(family.output_dir) / "independent" / "state.json")
    info = state.info("s/train")
    assert info["reused_from"] == "progressive" and info["checkpoint"] == str(prog) and state.done("s/train")
    assert list(state.steps["s/train"]["outputs"]) == [str(prog)]
    assert info["final_valid_loss"] == RunState(Path(family.output_dir) / "progressive" / "state.json").info(
        "s/train")["final_valid_loss"]
    rows = [plan_family(family, mode).rows[0] for mode in ("progressive", "independent")]
    assert rows[0].train_data_path == rows[1].train_data_path and rows[0].data_windows == rows[1].data_windows
    # everything verified and skipped on a rerun, the reuse included
    assert main(args) == 0
    assert capsys.readouterr().err.count("skipping") == 8   # progressive 5 + independent 3
    # a changed progressive s changes what the independent family reuses: both would be redone
    latest = prog / (prog / "latest").read_text().strip()
    model_file = sorted(latest.glob("*model_states.pt"))[0]
    original = model_file.read_bytes()
    try:
        model_file.write_bytes(original + b"\0")
        assert main(["run", str(fam), "--mode", "both", "--dry-run"]) == 0
    finally:
        model_file.write_bytes(original)
    out = capsys.readouterr().out
    assert "[independent] s/train: reuse progressive s" in out and "s/train: train s (from scratch)\n" in out
    assert "(done, will be skipped)" not in out.split("[independent] s/train")[1].split("\n")[0]
    assert "[independent] m/train: train m (from scratch)  (done, will be skipped)" in out


class _FakeNeoX:
    """Stands in for NeoXEngine: writes a NeoX log that loaded `shuffle_file`, logs one loss, saves nothing."""

    name = "neox"

    def __init__(self, shuffle_file: str):
        self.shuffle_file = shuffle_file
        self.finished = False

    def command(self, stage_yaml):
        return "fake neox"

    def train(self, stage_yaml, log_dir, quiet=False, callback=None):
        from neox_progressive.runner.engines import TrainResult, stage_save_dir

        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{Path(stage_yaml).stem}.neox.log"
        log.write_text(f"\n# fake neox\n    train_0:\n > loading shuffle-idx mapping from {self.shuffle_file}\n")
        if callback is not None:
            callback({"kind": "train", "iteration": 1, "loss": 5.0})
        self.finished = True   # the stage would have trained to its end
        return TrainResult(stage_save_dir(stage_yaml), log=log)


def test_a_neox_that_would_shuffle_the_fixed_data_epochs_is_stopped(data, tmp_path):
    """fixed_data_order: epochs with NeoX: the runner checks in NeoX's log that NeoX loaded the index maps written
    beside the window dataset, at the first logged loss; a NeoX that loaded other maps is stopped."""
    from neox_progressive.data.sample_order import neox_index_map_files
    from neox_progressive.errors import CheckFailed
    from neox_progressive.runner.family_run import FamilyRun

    fam = write_family(tmp_path / "family.yml", data, tmp_path / "out", **{**FAST, "name": "tiny_fixed", "budget": {
        "tokens_per_param": 0.5, "fixed_data": True}})   # its own name: its own window datasets beside the shared data
    family = load_family(fam)
    run = FamilyRun(family, "progressive", _FakeNeoX("elsewhere_shuffle_idx.npy"), quiet=True)
    run.prepare()
    row = run.plan.rows[-1]
    assert row.sample_order is not None and run.plan.rows[0].sample_order is None
    order = row.sample_order
    ours = neox_index_map_files(row.train_data_path, order["num_samples"], order["seq_length"], order["seed"])["shuffle"]
    assert ours.is_file()
    inputs = {"config": "x", "init": "scratch"}
    with pytest.raises(CheckFailed, match="member l: NeoX did not load .*shuffle_idx.npy"):
        run._train("l", run.stage_yaml("l"), None, inputs)
    assert not run.engine.finished   # stopped at its first logged loss
    run.engine = _FakeNeoX(str(ours))
    assert run._train("l", run.stage_yaml("l"), None, inputs)["checkpoint"]
    run.engine = _FakeNeoX("elsewhere")   # no epoch order for the first member: not checked
    run._train("s", run.stage_yaml("s"), None, inputs)
