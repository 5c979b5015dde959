"""The run's last step: evaluate the trained family (or both families) into `<output_dir>/report/`.

The family file's `eval` block gives the settings of `neox_progressive.eval.EvalSettings` by name
(tasks, kl_examples, kl_on, prompts, draft_len, ...); the held-out data is the family's validation data.
Like every step it is recorded in a state file (`<output_dir>/eval_state.json`) with the digests
of the checkpoints it scored, so it reruns only when a member changed.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Any

from neox_progressive.runner.state import RunState, digest


def eval_settings(family, quiet: bool, device: str | None):
    from neox_progressive.eval.settings import EvalSettings

    cfg = dict(family.eval)  # keys checked by load_family: EvalSettings fields + the runner's own
    names = {f.name for f in dataclasses.fields(EvalSettings)}
    kw = {k: v for k, v in cfg.items() if k in names}
    for k in ("modes", "skip"):
        if k in kw:
            kw[k] = tuple(kw[k])
    if "data" not in kw and "text" not in kw:
        kw["data"] = str(family.data.valid)  # required by the family file
    kw.setdefault("device", device or "auto")
    kw["quiet"] = quiet
    settings = EvalSettings(**kw)
    if cfg.get("example_tasks"):
        from neox_progressive.eval.tasks import EXAMPLE_TASKS

        settings.tasks = list(settings.tasks) + [t for t in EXAMPLE_TASKS if t not in settings.tasks]
    return settings, bool(cfg.get("example_tasks"))


def enabled(family) -> bool:
    return bool(family.eval.get("enabled", True))


def evaluate_runs(family, runs: list, *, quiet: bool = False, device: str | None = None) -> Path | None:
    """Evaluate the members trained by `runs` (FamilyRun objects, one per mode); returns the report dir."""
    from neox_progressive.eval.evaluation import evaluate_family
    from neox_progressive.eval.member import TrainedMember
    from neox_progressive.eval.report import write_report
    from neox_progressive.io.writer import AtomicDir

    members = []
    for run in runs:
        for name in run.names:
            info = run.results.get(f"{name}/train") or {}
            if not info.get("checkpoint"):
                return None
            members.append(TrainedMember(name=name, checkpoint=Path(info["checkpoint"]), configs=[run.stage_yaml(name)],
                                  family=run.mode))
    settings, example_tasks = eval_settings(family, quiet, device)
    out = Path(family.output_dir) / "report"
    state = RunState(Path(family.output_dir) / "eval_state.json")
    inputs: dict[str, Any] = {m.label: digest(m.checkpoint) for m in members}
    inputs["settings"] = repr(dataclasses.replace(settings, quiet=False))  # what is computed, not how it is shown
    if state.done("eval") and state.info("eval").get("inputs") == inputs:
        if not quiet:
            print(f"eval: done before, report verified: {out / 'report.md'}", file=sys.stderr)
        return out
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    with tempfile.TemporaryDirectory(prefix="neox-progressive-tasks-") as tasks_dir:
        if example_tasks:
            from neox_progressive.eval.tasks import write_example_tasks

            settings.include_paths = [*settings.include_paths, str(write_example_tasks(tasks_dir))]
        results = evaluate_family(members, settings, log=log)
    results["command"] = "neox-progressive " + " ".join(sys.argv[1:])
    with AtomicDir(out, force=True) as tmp:
        write_report(results, tmp)
    state.record("eval", [out], {"inputs": inputs})
    return out
