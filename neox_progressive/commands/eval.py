"""Evaluate a model family as the paper does (Yano et al. 2025, Sections 4-5).

Per member: validation perplexity on held-out NeoX data (NeoX's lm_loss_ppl: next-token cross
entropy over windows of seq_length + 1 tokens) and any lm-eval tasks (offline: local YAML tasks
via --include-path, or standard tasks whose datasets are in the local HF cache).

Per adjacent pair (smaller -> larger):
- KL divergence (Section 5.2, App. F) at every position over the vocabulary, averaged over the
  positions of an example, then over examples. Examples are validation documents sampled with
  --seed (the end-of-document token, then the document, truncated to the sequence length; our
  reading of "10,000 examples"), or windows of the token stream with --kl-on windows. The
  headline direction KL(p_small || p_large) is our reading of App. F, whose formula did not
  survive in the paper text: the draft/smaller member judged against the larger reference.
  KL(p_large || p_small) is reported next to it, with the top-1 agreement, the distribution of
  the per-example values (median, p90, p99, p99.9, max) and every per-example value (report.json).
- Speculative decoding (Section 5.3, Table 5) with the smaller member drafting 8 tokens per round
  for the larger one, greedy and sampled (Leviathan et al. 2023), on prompts sampled with --seed
  from validation documents: acceptance rate, mean accepted length per round (1 + accepted /
  rounds), wall time per prompt with and without the draft, speedup, dtype and device.

With two families (e.g. progressive/ and independent/ members) the tables put them side by side
(paper Tables 1, 4, 5), and member i of the second family also drafts for member i + 1 of the first.

Members: --member [FAMILY/]NAME=CHECKPOINT_DIR:CONFIG.yml[,CONFIG2.yml], small to large.
Writes report.md, report.json, PNG plots and lm_eval/*.json into --out (atomically).
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from neox_progressive.cli_options import add_flags, values_of
from neox_progressive.errors import UserError
from neox_progressive.eval.settings import STEPS, TASKS, EvalSettings

if TYPE_CHECKING:  # torch loads when the verb runs, not for --help
    from neox_progressive.eval.member import TrainedMember

HELP = "evaluate a family: perplexity, lm-eval tasks, adjacent-pair KL and speculative decoding, report"
EXAMPLES = """
  neox-progressive eval --out eval/ --data data/valid_text_document \\
      --member progressive/1B=runs/fam/progressive/1B/checkpoints:configs/1B.yml \\
      --member progressive/2B=runs/fam/progressive/2B/checkpoints:configs/2B.yml \\
      --member independent/1B=runs/fam/independent/1B/checkpoints:configs/1B.yml \\
      --member independent/2B=runs/fam/independent/2B/checkpoints:configs/2B.yml
  neox-progressive eval --out eval/ --text valid.jsonl --example-tasks --limit 100 --member 1B=ck1:1B.yml --member 2B=ck2:2B.yml
  neox-progressive eval --out eval/ --data valid --tasks lambada_openai,piqa --member ...   # datasets in the HF cache
  neox-progressive eval --write-example-tasks my_tasks/      # the offline example tasks, for lm_eval --include_path
"""


def add_arguments(p) -> None:
    p.add_argument("family", nargs="?", help="a family file: evaluate the members `neox-progressive run` trained (both "
                   "modes when both exist); or list them with --member")
    p.add_argument("--member", action="append", default=[], metavar="[FAMILY/]NAME=CKPT:CFG[,CFG]",
                   help="a member, repeatable, small to large within a family")
    p.add_argument("--out", help="output directory for report.md / report.json / plots")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--dry-run", action="store_true", help="print what would be evaluated; load no weights")
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format of the summary")
    groups: dict = {}
    add_flags(p, EvalSettings, groups=groups)  # the settings' own flags, help from their docstrings
    t = groups[TASKS]
    t.add_argument("--example-tasks", action="store_true", help="also run the offline stdlib example tasks")
    t.add_argument("--write-example-tasks", metavar="DIR", help="only write the example tasks into DIR and exit")


def _csv(value: str) -> list[str]:
    return [x.strip() for x in value.split(",") if x.strip()]


def settings_from(args) -> EvalSettings:
    kw = values_of(EvalSettings, args)
    skip = tuple(_csv(kw["skip"]))
    bad = [x for x in skip if x not in STEPS]
    modes = tuple(_csv(kw["modes"]))
    if bad:
        raise UserError(f"--skip {','.join(bad)}: unknown step; the steps are {', '.join(STEPS)}")
    if not modes or any(m not in ("greedy", "sampled") for m in modes):
        raise UserError(f"--modes {kw['modes']!r}: expected greedy, sampled or greedy,sampled")
    for name in ("ppl_windows", "kl_examples", "batch_size", "draft_len", "prompts", "prompt_tokens", "new_tokens"):
        if kw[name] < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {kw[name]}")
    tasks = _csv(kw["tasks"])
    if args.example_tasks:
        from neox_progressive.eval.tasks import EXAMPLE_TASKS

        tasks += [t for t in EXAMPLE_TASKS if t not in tasks]
    return EvalSettings(**{**kw, "skip": skip, "modes": modes, "tasks": tasks, "include_paths": list(kw["include_paths"])})


def members_from(args, s: EvalSettings) -> list[TrainedMember]:
    """The members to evaluate: a family file's trained members (its held-out data unless --data/--text), or --member."""
    from neox_progressive.eval.member import TrainedMember

    if args.family:
        if args.member:
            raise UserError("pass either a family file or --member specs, not both")
        from neox_progressive.family import load_family

        family = load_family(args.family)
        if not (s.data or s.text):
            s.data = str(family.data.valid)
        return family_members(family)
    if not args.member:
        raise UserError("no members: pass a family file, or --member [FAMILY/]NAME=CHECKPOINT_DIR:CONFIG.yml for each, "
                        "small to large")
    return [TrainedMember.parse(spec) for spec in args.member]


def family_members(family) -> list[TrainedMember]:
    """The trained members of a family's run (`neox-progressive run`), for every mode that has them."""
    from neox_progressive.eval.member import TrainedMember
    from neox_progressive.family import MODES, member_dirs
    from neox_progressive.runner.family_run import stage_yaml_of

    members = []
    for mode in MODES:
        for m in family.members:
            save, yml = member_dirs(family, mode, m.name).checkpoints, stage_yaml_of(family, mode, m.name)
            if yml.is_file() and (save / "latest").is_file():
                members.append(TrainedMember(name=m.name, checkpoint=save, configs=[yml], family=mode))
    if not members:
        raise UserError(f"{family.path}: no trained members under {family.output_dir} (run `neox-progressive run "
                        f"{family.path}` first, or list checkpoints with --member)")
    return members


def dry_run(members: list[TrainedMember], s: EvalSettings, fmt: str = "text") -> None:
    from neox_progressive.eval.evaluation import group_families, pairs_of

    fams = group_families(members)
    plan = {"families": {fam: [{"name": m.name, "checkpoint": str(m.checkpoint), "format": m.reader.format,
                                "tp": m.reader.tp, "iteration": m.reader.iteration, "num_layers": m.shape.num_layers,
                                "hidden_size": m.shape.hidden_size, "params": m.shape.param_count()} for m in ms]
                         for fam, ms in fams.items()},
            "steps": [x for x in STEPS if s.wants(x)], "tasks": list(s.tasks),
            "pairs": [{"draft": a.label, "target": b.label, "cross_family": cross} for a, b, cross in pairs_of(fams)]}
    if fmt == "json":
        print(json.dumps(plan, indent=1))
        return
    for fam, ms in plan["families"].items():
        print(f"family {fam}:")
        for m in ms:
            print(f"  {m['name']}: {m['checkpoint']} ({m['format']}, TP {m['tp']}, iteration {m['iteration']}), "
                  f"{m['num_layers']} layers x {m['hidden_size']}, {m['params'] / 1e6:.1f}M params")
    print(f"steps: {', '.join(plan['steps']) or 'none'}; tasks: {', '.join(s.tasks) or 'none'}")
    for pair in plan["pairs"]:
        print(f"pair {pair['draft']} -> {pair['target']}" + (" (cross-family)" if pair["cross_family"] else ""))


def run(args) -> int:
    from neox_progressive.eval.evaluation import evaluate_family
    from neox_progressive.eval.report import write_report
    from neox_progressive.io.writer import AtomicDir, check_destination

    if args.write_example_tasks:
        from neox_progressive.eval.tasks import write_example_tasks

        out = write_example_tasks(args.write_example_tasks)
        print(f"wrote the example tasks into {out}: lm_eval --include_path {out} --tasks stdlib_lastword,stdlib_choice,...")
        return 0
    if not args.out and not args.dry_run:
        raise UserError("--out is required: the directory for report.md, report.json and the plots")
    s = settings_from(args)
    members = members_from(args, s)
    if args.dry_run:
        dry_run(members, s, args.format)
        return 0
    check_destination(args.out, args.force)
    with tempfile.TemporaryDirectory(prefix="neox-progressive-tasks-") as tasks_dir:
        if args.example_tasks:
            from neox_progressive.eval.tasks import write_example_tasks

            s.include_paths.append(str(write_example_tasks(tasks_dir)))
        raw: dict = {}
        results = evaluate_family(members, s, log=lambda msg: print(msg, file=sys.stderr), raw=raw)
    results["command"] = "neox-progressive " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with AtomicDir(args.out, args.force) as tmp:
        written = write_report(results, tmp)
        if raw:
            (tmp / "lm_eval").mkdir()
            for label, res in raw.items():
                (tmp / "lm_eval" / f"{label.replace('/', '_')}.json").write_text(json.dumps(res, indent=2, default=str))
    if args.format == "json":
        print(json.dumps({"out": str(args.out), "report": str(Path(args.out) / "report.md"),
                          "files": [p.name for p in written]}, indent=1))
    else:
        print(f"wrote {Path(args.out) / 'report.md'} ({', '.join(p.name for p in written)})")
    return 0
