"""Train a whole model family from its family file, stage after stage, resumably.

For each member in order: expand the previous member's final checkpoint into this member's
initialization (bert2BERT AKI, progressive mode, member > 1), train the stage (GPT-NeoX in a
subprocess with --engine neox, or the builtin single-device engine), check that training really
started from the expanded weights, and record the step. At the end the family is evaluated
(perplexity, adjacent-pair KL, speculative decoding, configured lm-eval tasks) into
<output_dir>/report/.

Everything goes under the family's output_dir:
  <output_dir>/<mode>/configs/stage_<member>.yml     the NeoX configs (written on every run)
  <output_dir>/<mode>/<member>/expanded              member k's expanded init (its `load`)
  <output_dir>/<mode>/<member>/checkpoints           member k's NeoX checkpoints (its `save`)
  <output_dir>/<mode>/logs/, <output_dir>/<mode>/state.json, <output_dir>/report/

Resumable: run the same command again after an interruption (Ctrl-C, a killed job, a node
failure). Finished steps whose outputs are unchanged are skipped; an interrupted stage continues
from its latest checkpoint; a changed family file redoes what it changes (a comment or the family
file's name is no change).

One run per family at a time: `run` locks `<output_dir>/.neox-progressive-run.lock` and a second
`run` on the same output_dir is refused, naming the first's PID and command (the lock of a killed run
is taken over). Temporary dirs that killed writers left in the output dir are removed, and said so.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from neox_progressive.errors import UserError

LOCK_FILE = ".neox-progressive-run.lock"
"""In the family's output_dir while a `run` works on it: a second `run` there is refused, naming the first."""

HELP = "train a family: expand -> train -> stage-start check per member, then evaluate (resumable)"
EXAMPLES = """
  neox-progressive prepare-data --family configs/neox/tiny_family.yml     # its data (stdlib text) and windows
  neox-progressive run configs/neox/tiny_family.yml --engine builtin
  neox-progressive run configs/neox/tiny_family.yml --engine builtin --mode both     # progressive and independent
  neox-progressive run configs/neox/paper_2x_chinchilla.yml --engine neox --neox-dir ~/gpt-neox --dry-run
  neox-progressive run configs/neox/paper_2x_chinchilla.yml --engine neox --neox-dir ~/gpt-neox \\
      --neox-python ~/neox-env/bin/python --neox-launcher-args="--hostfile /job/hostfile"
"""


def add_arguments(p) -> None:
    p.add_argument("family", help="the family file (YAML; see the README's 'Family files')")
    p.add_argument("--mode", choices=["progressive", "independent", "both"],
                   help="progressive (Eq. 4 budgets, each member from the expanded previous one), independent (each from "
                        "scratch at its full budget, the paper's baseline) or both (the first member, the same model in "
                        "both, is trained once); default: the family file's mode")
    p.add_argument("--engine", choices=["builtin", "neox"], default="builtin",
                   help="neox: python DIR/deepy.py DIR/train.py stage.yml per stage; builtin: the embedded one-device "
                        "trainer (default)")
    p.add_argument("--neox-dir", default=os.environ.get("NEOX_DIR") or None,
                   help="GPT-NeoX checkout (with deepy.py), for --engine neox (default: $NEOX_DIR)")
    p.add_argument("--neox-python", help="the Python of NeoX's environment (default: this one)")
    p.add_argument("--neox-launcher-args", default="", help="extra arguments for deepy.py (e.g. '--hostfile FILE')")
    p.add_argument("--device", help="builtin engine and checks: cpu, cuda, cuda:N (default: CUDA when available)")
    p.add_argument("--output-dir", help="override the family file's output_dir")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--dry-run", action="store_true", help="print every step and command; run nothing")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="the format of the final summary, and of the --dry-run listing")


def make_engine(args):
    from neox_progressive.runner.engines import BuiltinEngine, NeoXEngine

    if args.engine == "builtin":
        if args.neox_dir and args.neox_dir != os.environ.get("NEOX_DIR"):  # $NEOX_DIR alone is not a contradiction
            raise UserError("--neox-dir is only used with --engine neox")
        return BuiltinEngine(device=args.device)
    if not args.neox_dir:
        raise UserError("--engine neox needs --neox-dir DIR, a GPT-NeoX checkout with deepy.py")
    return NeoXEngine(args.neox_dir, python=args.neox_python, launcher_args=args.neox_launcher_args.split())


def modes_of(args, family) -> list[str]:
    mode = args.mode or getattr(family, "mode", None) or "progressive"
    return ["progressive", "independent"] if mode == "both" else [mode]


def run(args) -> int:
    from neox_progressive.family import load_family
    from neox_progressive.io.atomic import check_writable_dir, temp_notes
    from neox_progressive.io.lock import OutputLock, describe_holder
    from neox_progressive.runner import evaluate
    from neox_progressive.runner.family_run import family_runs

    overrides = {"output_dir": str(Path(args.output_dir).resolve())} if args.output_dir else None
    family = load_family(args.family, overrides)
    engine = make_engine(args)
    runs = family_runs(family, modes_of(args, family), engine, quiet=args.quiet, device=args.device)
    for r in runs:
        r.check_data()  # before anything is written (a dry run refuses the same)
    out = Path(family.output_dir)
    if args.dry_run:
        evaluates = evaluate.enabled(family) and not args.no_eval
        notes = temp_notes([out, *(r.root for r in runs)])
        if args.format == "json":
            print(json.dumps({"family": family.name, "output_dir": str(out), "runs": [r.dry_run() for r in runs],
                              "evaluate_into": str(out / "report") if evaluates else None, "notes": notes,
                              "dry_run": True}, indent=2, default=str))
            return 0
        for r in runs:
            print("\n".join(r.describe()))
        if evaluates:
            print(f"evaluate the trained members into {out / 'report'}")
        for note in notes:
            print(f"note: {note}")
        return 0
    check_writable_dir(out, "output_dir")
    out.mkdir(parents=True, exist_ok=True)
    with OutputLock(out / LOCK_FILE, f"the family output dir {out}") as lock:
        if lock.took_over:
            _log(f"took over the lock of {describe_holder(lock.took_over)}, which is no longer running", args.quiet)
        for note in temp_notes([out, *(r.root for r in runs)], remove=True):
            _log(note, args.quiet)
        return _run_locked(args, family, runs)


def _log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _run_locked(args, family, runs) -> int:
    from neox_progressive.runner import evaluate, summary

    for r in runs:
        r.run()
    report = None
    if evaluate.enabled(family) and not args.no_eval:
        report = evaluate.evaluate_runs(family, runs, quiet=args.quiet, device=args.device)
    results, names, plot = summary.summarize(runs, Path(family.output_dir) / "loss_vs_flops.png")
    if args.format == "json":
        print(json.dumps({"results": results, "report": str(report) if report else None,
                          "plot": str(plot) if plot else None}, indent=2, default=str))
        return 0
    print(summary.summary_text(results, names, plot, report))
    print(f"state: {', '.join(str(r.state.path) for r in runs)}", file=sys.stderr)
    return 0
