"""Run the built-in tiny example end to end: a 3-member family trained progressively and independently.

On CPU in a few minutes, with no download:
  1. tokenize real text (the docstrings of Python's standard library, on every machine, shuffled
     with a fixed seed so that every slice of the stream holds the same mix of modules, as a web
     corpus does) with a small SentencePiece model trained on it, into GPT-NeoX's mmap format;
  2. plan the family (the paper's Eq. 4 budgets, so the progressive family costs what its largest
     member costs from scratch) and write its NeoX stage configs;
  3. train it with the builtin engine, progressively (each member from the AKI-expanded previous
     one, with the stage-start check) and independently (each from scratch), once per --seeds
     (training and expansion seed), so that run-to-run spread can be told from a difference;
  4. evaluate both families of every seed (perplexity, KL between adjacent members in both
     directions, speculative decoding);
  5. print the budget table, the final validation losses, and which of the paper's consistency
     findings (Tables 4 and 5) the run reproduces: per figure the KL documents and prompts behind
     it and whether the difference between the families is larger than the spread between seeds;
     plot validation loss against cumulative FLOPs (the paper's Fig. 2).

Everything is written under --out. Running it again resumes (finished steps are skipped).

--family FILE runs the same steps on another tiny family file (its output_dir, data, tokenizer and
vocab_size are replaced by the demo's), e.g. the shipped Pythia-style one: NeoX's classic transformer
with LayerNorm, GeLU, parallel residual and partial rotary (examples/tiny_pythia_family.yml).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HELP = "train the built-in tiny family progressively and independently on CPU (a few minutes)"
EXAMPLES = """
  neox-progressive demo --out demo_out
  neox-progressive demo --out demo_out --force          # start over
  neox-progressive demo --out demo_out --seeds 1        # one training run per family (no seed spread)
  neox-progressive demo --out demo_out --device cuda    # on a GPU
  neox-progressive demo --out demo_pythia --family neox_progressive/examples/tiny_pythia_family.yml
"""

FAMILY_FILE = Path(__file__).resolve().parent.parent / "examples" / "tiny_family.yml"
PYTHIA_FAMILY_FILE = FAMILY_FILE.with_name("tiny_pythia_family.yml")
DEMO_CHARS = 1_500_000  # all of the stdlib docstrings (about 1.5M characters)
DEMO_VOCAB = 512
SHUFFLE_SEED = 0
DEFAULT_SEEDS = 2


def add_arguments(p) -> None:
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--force", action="store_true", help="delete an existing --out first and start over")
    p.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    p.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help=f"train both families this many times, seeds 1..N (default {DEFAULT_SEEDS}); the summary says "
                   "whether each progressive-vs-independent difference is larger than the spread between seeds")
    p.add_argument("--quiet", action="store_true", help="only the final tables")
    p.add_argument("--dry-run", action="store_true", help="print the family's budgets and what would be written; "
                   "prepare, train and write nothing")
    p.add_argument("--format", choices=["text", "json"], default="text",
                   help="the format of the final summary (json: the results, the report dirs and the plot)")
    p.add_argument("--family", default=str(FAMILY_FILE), metavar="FILE",
                   help="a tiny family file to run instead of the built-in Llama-shape one, e.g. "
                        f"{PYTHIA_FAMILY_FILE.relative_to(FAMILY_FILE.parents[2])} (NeoX's classic transformer); its "
                        "output_dir, data, tokenizer and vocab_size are the demo's")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def prepare(out: Path, quiet: bool) -> dict:
    from neox_progressive.data import dataset_exists, stdlib_corpus
    from neox_progressive.data.prepare import prepare_data

    prefix = out / "data" / "stdlib"
    tokenizer = Path(str(prefix) + ".tokenizer.model")
    valid = str(prefix) + "_valid"
    if not (dataset_exists(prefix) and dataset_exists(valid) and tokenizer.is_file()):
        docs = stdlib_corpus(DEMO_CHARS)
        # sorted file order would give each member's data window its own modules (s: a-c, m: c-h, l: h-z) and the
        # independent members (which all start at the stream's beginning) mostly the same ones
        random.Random(SHUFFLE_SEED).shuffle(docs)
        _say(f"1. tokenizing {len(docs)} standard-library docstrings ({sum(map(len, docs)):,} characters, shuffled)")
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prepare_data(lambda: iter(docs), prefix, vocab_size=DEMO_VOCAB, valid_fraction=0.05, force=True, quiet=quiet)
    else:
        _say(f"1. data already prepared in {prefix.parent}")
    return {"train": str(prefix), "valid": valid, "tokenizer": str(tokenizer)}


def demo_family(out: Path, data: dict, seed: int, family_file: str | Path = FAMILY_FILE):
    """The tiny family on the demo's data; seed 1 trains into out/family, seed k > 1 into out/family_seed<k>."""
    from neox_progressive.family import load_family

    return load_family(family_file, {
        "output_dir": str(out / ("family" if seed == 1 else f"family_seed{seed}")), "model": {"vocab_size": DEMO_VOCAB},
        "data": {"train": data["train"], "valid": data["valid"]},
        "shared": {"tokenizer_type": "SPMTokenizer", "vocab_file": data["tokenizer"]},
        "training": {"seed": 1234 + seed - 1}, "expansion": {"seed": seed - 1},
    })


def _dry_run(out: Path, args) -> int:
    """The budgets of the demo's family and the directories a run would write (nothing is prepared or written)."""
    from neox_progressive.family import plan_family
    from neox_progressive.family.report import plan_json, plan_summary, plan_table

    prefix = out / "data" / "stdlib"
    data = {"train": str(prefix), "valid": f"{prefix}_valid", "tokenizer": f"{prefix}.tokenizer.model"}
    families = [demo_family(out, data, seed, args.family) for seed in range(1, args.seeds + 1)]
    plan = plan_family(families[0], "progressive")
    writes = {"data": str(prefix.parent), "families": [str(f.output_dir) for f in families],
              "plot": str(out / "loss_vs_flops.png")}
    if args.format == "json":
        print(json.dumps({"out": str(out), "dry_run": True, "replaces_out": bool(args.force and out.exists()),
                          "writes": writes, "plan": plan_json(families[0], plan)}, indent=1, default=str))
        return 0
    print("\n".join(plan_table(plan) + plan_summary(plan)))
    print(f"dry run: nothing written; would write {writes['data']} (data, tokenizer), "
          f"{', '.join(writes['families'])} (both families per seed) and {writes['plot']}")
    return 0


def report_losses(reports: list[dict | None]) -> list[str]:
    """Each seed's validation loss per member as the evaluation report measures it (all members on the same windows)."""
    rows, windows = {}, None
    for rep in reports:
        for fam, data in (rep or {}).get("families", {}).items():
            for m in data["members"]:
                ppl = m.get("perplexity") or {}
                if "loss" in ppl:
                    rows.setdefault((fam, m["name"]), []).append(f"{ppl['loss']:.4f}")
                    windows = ppl.get("windows")
    if not rows:
        return []
    lines = [f"validation loss in the evaluation report ({windows} windows of the validation data, the same for every "
             "member; per seed):", "", "| mode | member | validation loss |", "|---|---|---|"]
    return lines + [f"| {fam} | {name} | {' / '.join(v)} |" for (fam, name), v in rows.items()]


def run(args) -> int:
    import shutil

    from neox_progressive.errors import UserError
    from neox_progressive.eval.findings import seeds_summary
    from neox_progressive.family import plan_family
    from neox_progressive.family.report import plan_summary, plan_table
    from neox_progressive.runner import evaluate, summary
    from neox_progressive.runner.engines import BuiltinEngine
    from neox_progressive.runner.family_run import family_runs

    if args.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {args.seeds}")
    out = Path(args.out).resolve()
    if args.dry_run:
        return _dry_run(out, args)
    if out.exists() and args.force:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(out, args.quiet)
    families = [demo_family(out, data, seed, args.family) for seed in range(1, args.seeds + 1)]
    _say("2. the family's budgets (Eq. 4):")
    plan = plan_family(families[0], "progressive")
    print("\n".join(plan_table(plan) + plan_summary(plan)))
    engine = BuiltinEngine(device=args.device)
    reports = []
    for seed, family in enumerate(families, 1):
        runs = family_runs(family, ["progressive", "independent"], engine, quiet=args.quiet, device=args.device)
        for i, r in enumerate(runs):
            _say(f"3{'ab'[i]}. seed {seed}/{args.seeds}: training the {r.mode} family with the builtin engine")
            r.run()
        _say(f"4. seed {seed}/{args.seeds}: evaluating both families")
        report = evaluate.evaluate_runs(family, runs, quiet=args.quiet, device=args.device)
        reports.append(json.loads((report / "report.json").read_text()) if report else None)
        if seed == 1:
            first = (runs, report)
    results, names, plot = summary.summarize(first[0], out / "loss_vs_flops.png")
    if args.format == "json":
        print(json.dumps({"results": results, "plot": str(plot) if plot else None, "reports": reports,
                          "findings": seeds_summary([r for r in reports if r])}, indent=1, default=str))
        return 0
    print("\nfinal validation losses (seed 1; each run's own evaluation: its first eval_iters x global batch "
          "validation samples, 16 for s and m, 32 for l):")
    print(summary.summary_text(results, names, plot, first[1]))
    print("\n" + "\n".join(report_losses(reports)))
    print("\n" + "\n".join(seeds_summary([r for r in reports if r])))
    print("demo OK")
    return 0
