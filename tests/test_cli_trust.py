"""The file system and other processes, through the real CLI (issue 14): read-only and full disks, one writer per
output (two real processes), debris of killed writers, the umask, and `run` refusing before it writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_util import ENV, ROOT, cli, fill_to, in_namespace, needs_namespace, one_line_error, snapshot
from expand_util import shape, wider, write_source
from runner_util import FAST, write_family
from tiny import write_yaml

from neox_progressive.data.mmap_dataset import write_dataset
from neox_progressive.expand import plan_for


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    src = shape()
    write_source(root, src)
    write_yaml(root / "dst.yml", wider(src, 5, ffn=60))
    return root


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """The tiny family over stand-in datasets (enough for everything `run` checks before it trains)."""
    root = tmp_path_factory.mktemp("fam")
    rng = np.random.default_rng(0)
    for name in ("train", "valid"):
        write_dataset(root / "data" / name, [rng.integers(0, 512, 200) for _ in range(50)], vocab_size=512)
    data = {"train": str(root / "data" / "train"), "valid": str(root / "data" / "valid"), "tokenizer": str(root / "tok.model")}
    return root, data


def expand_args(ck: Path, out, *extra):
    return ["expand", "--src", ck / "src", "--src-config", ck / "src.yml", "--dst-config", ck / "dst.yml", "--out", out,
            "--quiet", *extra]


def killed_writer(out: Path) -> Path:
    """A real temporary dir beside `out`, left by a writer killed (SIGKILL) while writing; returns it."""
    code = ("import os, sys; sys.path.insert(0, sys.argv[2]); from neox_progressive.io.atomic import AtomicDir\n"
            "tmp = AtomicDir(sys.argv[1]).__enter__(); (tmp / 'part').write_bytes(b'0' * 4096)\n"
            "print(tmp, flush=True); os.kill(os.getpid(), 9)")
    res = subprocess.run([sys.executable, "-c", code, str(out), str(ROOT)], capture_output=True, text=True, env=ENV)
    assert res.returncode == -signal.SIGKILL, res.stderr
    tmp = Path(res.stdout.strip())
    assert tmp.is_dir() and ".tmp-neox-progressive-" in tmp.name
    return tmp


def background(args, extra_code: str, argv0: str = "neox-progressive") -> subprocess.Popen:
    """The CLI in a background process, after `extra_code` (which makes its work wait, see the tests)."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.argv = {[argv0, *map(str, args)]!r}\n{extra_code}\n"
            "from neox_progressive.cli import main\nsys.exit(main(sys.argv[1:]))")
    return subprocess.Popen([sys.executable, "-c", code], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def wait_for(path: Path, proc: subprocess.Popen, polls: int = 3000) -> None:
    """Until the background process creates `path`; fails if it exits first (a guard of `polls` x 0.1 s against a
    hang, not a timing assertion)."""
    for _ in range(polls):
        if path.exists():
            return
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    pytest.fail(f"{path} did not appear and the process is still running")


# ---- read-only and full disks (a real tmpfs in a private mount namespace) -------------------------------------------
@needs_namespace
def test_read_only_destinations(tmp_path, ck, fam):
    ro = tmp_path / "ro"
    for args, what in [
        (expand_args(ck, ro / "out"), f"--out {ro / 'out'}: {ro} is on a read-only file system"),
        (["export-hf", ck / "src", "--config", ck / "src.yml", "--out", ro / "hf", "--no-tokenizer", "--quiet"],
         f"{ro} is on a read-only"),
        (["eval", "--member", f"s={ck / 'src'}:{ck / 'src.yml'}", "--text", ck / "src.yml", "--out", ro / "report"],
         f"--out {ro / 'report'}: {ro} is on a read-only file system"),
    ]:
        msg = one_line_error(in_namespace(ro, "ro,size=1m", *args, after=f"ls -A {ro}"))
        assert what in msg, msg
    family = write_family(tmp_path / "family.yml", fam[1], ro / "runs", **FAST)
    res = in_namespace(ro, "ro,size=1m", "run", family, "--engine", "builtin", "--device", "cpu", after=f"ls -A {ro}")
    msg = one_line_error(res)
    assert f"output_dir {ro / 'runs'}: {ro} is on a read-only file system" in msg
    assert res.stdout.strip() == ""  # `ls -A` of the mount: nothing written


@needs_namespace
def test_not_enough_space_is_refused_before_starting(tmp_path, ck):
    full = tmp_path / "full"
    need = plan_for(ck / "src", [ck / "src.yml"], [ck / "dst.yml"])[0].total_bytes
    res = in_namespace(full, "size=64k", *expand_args(ck, full / "out"), after=f"ls -A {full}")
    msg = one_line_error(res)
    assert f"not enough space on {full} for --out {full / 'out'}: needs about {need:,} bytes, 65,536 free" in msg
    assert res.stdout.strip() == ""


@needs_namespace
@pytest.mark.parametrize("verb", ["expand", "export-hf"])
def test_a_disk_that_fills_up_while_writing(tmp_path, ck, verb):
    """The free space passes the check (the tensor bytes fit) but not the files' overhead: ENOSPC mid-write."""
    full = tmp_path / "full"
    plan = plan_for(ck / "src", [ck / "src.yml"], [ck / "dst.yml"])[0]
    if verb == "expand":
        need, args = plan.total_bytes, expand_args(ck, full / "out")
    else:
        need = plan.src.param_count() * 4
        args = ["export-hf", ck / "src", "--config", ck / "src.yml", "--out", full / "out", "--no-tokenizer", "--quiet"]
    # free: the tensor bytes and one page for the lock file, rounded up to whole pages
    res = in_namespace(full, "size=2m", *args, before=fill_to(full, need + 4097), after=f"ls -A {full}")
    msg = one_line_error(res)
    assert f"no space left on {full} writing {full}/.out.tmp-neox-progressive-" in msg, msg
    assert f"(needs about {need:,} bytes, " in msg and "nothing was written" in msg
    assert res.stdout.split() == ["filler"]  # no temporary dir, no lock file, no output


# ---- one writer per output: two real processes ---------------------------------------------------------------------
WAIT_IN_EXPANSION = """
import pathlib, time
from neox_progressive.expand import rules
_reads = rules.RULES["reads_hidden"]
def reads_hidden(*a, **k):  # the first layer tensor waits until the test says go
    pathlib.Path({ready!r}).touch()
    while not pathlib.Path({go!r}).exists():
        time.sleep(0.05)
    return _reads(*a, **k)
rules.RULES["reads_hidden"] = reads_hidden
"""


def test_two_expands_to_one_out(tmp_path, ck):
    out, ready, go = tmp_path / "out", tmp_path / "ready", tmp_path / "go"
    first = background(expand_args(ck, out), WAIT_IN_EXPANSION.format(ready=str(ready), go=str(go)))
    try:
        wait_for(ready, first)  # the first is writing its temporary dir, holding .out.lock
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-neox-progressive-")]
        msg = one_line_error(cli(*expand_args(ck, out)))
        assert f"--out {out} is in use by PID {first.pid} (`neox-progressive expand --src" in msg, msg
        assert [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-neox-progressive-")] == temps  # kept
        go.touch()
        assert first.wait(300) == 0, first.stdout.read()
    finally:
        first.kill()
    assert (out / "latest").is_file() and not (tmp_path / ".out.lock").exists()
    assert cli("inspect", out, "--config", ck / "dst.yml", "--quiet").returncode == 0


HOLD_RUN = """
import pathlib, time
import neox_progressive.commands.run as run
def hold(*a, **k):
    pathlib.Path({ready!r}).touch()
    time.sleep(600)
run._run_locked = hold
"""
QUICK_RUN = """
import neox_progressive.commands.run as run
run._run_locked = lambda *a, **k: print("the run's work ran") or 0
"""


def test_two_runs_on_one_family_dir_and_a_killed_runs_lock(tmp_path, fam):
    family = write_family(tmp_path / "family.yml", fam[1], tmp_path / "runs", **FAST)
    args = ["run", family, "--engine", "builtin", "--device", "cpu", "--no-eval"]
    ready = tmp_path / "ready"
    first = background(args, HOLD_RUN.format(ready=str(ready)))
    try:
        wait_for(ready, first)
        before = snapshot(tmp_path / "runs")
        msg = one_line_error(cli(*args))
        assert f"the family output dir {tmp_path / 'runs'} is in use by PID {first.pid} (`neox-progressive run" in msg
        assert snapshot(tmp_path / "runs") == before
    finally:
        first.kill()
        first.wait()
    stale = killed_writer(tmp_path / "runs" / "progressive" / "m" / "expanded")
    size = sum(f.stat().st_size for f in stale.rglob("*"))
    third = background(args, QUICK_RUN)
    out = third.communicate(timeout=300)[0]
    assert third.returncode == 0, out
    assert f"took over the lock of PID {first.pid}" in out and "which is no longer running" in out
    assert f"removed {stale} ({size:,} bytes), left by PID" in out and not stale.exists()
    assert "the run's work ran" in out and not (tmp_path / "runs" / ".neox-progressive-run.lock").exists()


# ---- debris and permissions ---------------------------------------------------------------------------------------
def test_debris_of_a_killed_writer_is_named_by_inspect_and_removed_beside_any_out(tmp_path, ck):
    stale = killed_writer(tmp_path / "one")
    size = sum(f.stat().st_size for f in stale.rglob("*"))
    res = cli("inspect", ck / "src")  # elsewhere: no note
    assert res.returncode == 0 and "note:" not in res.stdout
    (tmp_path / "ck").symlink_to(ck / "src")
    res = cli("inspect", tmp_path / "ck")
    assert res.returncode == 0 and f"note: {stale} ({size:,} bytes) was left by PID" in res.stdout
    assert "killed while writing" in res.stdout and stale.exists()  # inspect writes nothing
    res = cli(*expand_args(ck, tmp_path / "another"))
    assert res.returncode == 0, res.stderr
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["another", "ck"]


def test_outputs_follow_the_umask(tmp_path, ck):
    cmd = " ".join(f"'{a}'" for a in [sys.executable, "-m", "neox_progressive", *map(str, expand_args(ck, tmp_path / "o"))])
    res = subprocess.run(["sh", "-c", f"umask 027; exec {cmd}"], env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "o", *(tmp_path / "o").rglob("*")]}
    assert modes["o"] == modes["global_step0"] == 0o750, modes
    assert modes["latest"] == modes["expansion.json"] == 0o640, modes


# ---- run refuses before it writes ----------------------------------------------------------------------------------
def test_run_with_missing_data_writes_nothing(tmp_path, fam):
    data = dict(fam[1], train=str(tmp_path / "nodata" / "train"))
    family = write_family(tmp_path / "family.yml", data, tmp_path / "runs", **FAST)
    for extra in ([], ["--dry-run"]):
        msg = one_line_error(cli("run", family, "--engine", "builtin", "--device", "cpu", *extra))
        assert f"the family's training data {tmp_path / 'nodata' / 'train'}.bin/.idx does not exist" in msg
        assert "prepare-data --family" in msg
        assert not (tmp_path / "runs").exists()


def test_lock_refuses_while_held_in_this_process(tmp_path):
    """The lock itself, in-process: a second holder is refused, the holder's record is written and removed."""
    from neox_progressive.errors import UserError
    from neox_progressive.io.lock import OutputLock, read_record

    with OutputLock(tmp_path / "x.lock", "thing") as lock:
        assert read_record(lock.path)["pid"] == os.getpid()
        with pytest.raises(UserError, match=f"thing is in use by PID {os.getpid()}"):
            OutputLock(tmp_path / "x.lock", "thing").acquire()
    assert not (tmp_path / "x.lock").exists()


def test_step_inputs_ignore_the_family_files_name_and_the_dry_run_judges_what_the_run_writes(tmp_path, fam):
    """In-process and fast (the end-to-end run is in test_runner_family.py): the inputs of every step of a renamed
    family file equal the original's; a value only the stage YAMLs carry changes them, even in a dry run whose
    stage YAMLs on disk are still the old ones."""
    from neox_progressive.family import generate_configs, load_family
    from neox_progressive.runner.engines import BuiltinEngine
    from neox_progressive.runner.family_run import FamilyRun

    a = write_family(tmp_path / "a.yml", fam[1], tmp_path / "runs", **FAST)
    b = tmp_path / "renamed.yml"
    b.write_text("# another comment\n" + a.read_text())
    c = write_family(tmp_path / "c.yml", fam[1], tmp_path / "runs", **{**FAST, "training": {**FAST["training"],
                                                                                                "weight_decay": 0.02}})
    run_a = FamilyRun(load_family(a), "progressive", BuiltinEngine(device="cpu"), quiet=True)
    generate_configs(run_a.family, run_a.configs_dir, "progressive")  # what a run of a.yml leaves on disk
    on_disk = {s.name: s.inputs() for s in run_a.steps()}

    def planned(path):
        r = FamilyRun(load_family(path), "progressive", BuiltinEngine(device="cpu"), quiet=True)
        r.describe()
        return {s.name: s.inputs() for s in r.steps()}

    assert planned(b) == on_disk and None not in on_disk["s/train"].values()
    assert planned(c)["s/train"] != on_disk["s/train"]
