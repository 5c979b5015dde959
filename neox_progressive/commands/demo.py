"""Run the built-in tiny example end to end: a 3-member family trained progressively and independently.

On CPU in a few minutes, with no download:
  1. tokenize real text (the docstrings of Python's standard library, on every machine) with a
     small SentencePiece model trained on it, into GPT-NeoX's mmap format;
  2. plan the family (the paper's Eq. 4 budgets, so the progressive family costs what its largest
     member costs from scratch) and write its NeoX stage configs;
  3. train it twice with the builtin engine: progressive (each member from the AKI-expanded
     previous one, with the stage-start check) and independent (each from scratch);
  4. evaluate both families (perplexity, KL between adjacent members, speculative decoding);
  5. print the budget table and the final validation losses, and plot validation loss against
     cumulative FLOPs (the paper's Fig. 2).

Everything is written under --out. Running it again resumes (finished steps are skipped).

--family FILE runs the same steps on another tiny family file (its output_dir, data, tokenizer and
vocab_size are replaced by the demo's), e.g. the shipped Pythia-style one: NeoX's classic transformer
with LayerNorm, GeLU, parallel residual and partial rotary (examples/tiny_pythia_family.yml).
"""

from __future__ import annotations

import sys
from pathlib import Path

HELP = "train the built-in tiny family progressively and independently on CPU (a few minutes)"
EXAMPLES = """
  neox-progressive demo --out demo_out
  neox-progressive demo --out demo_out --force          # start over
  neox-progressive demo --out demo_out --device cuda    # on a GPU
  neox-progressive demo --out demo_pythia --family neox_progressive/examples/tiny_pythia_family.yml
"""

FAMILY_FILE = Path(__file__).resolve().parent.parent / "examples" / "tiny_family.yml"
PYTHIA_FAMILY_FILE = FAMILY_FILE.with_name("tiny_pythia_family.yml")
DEMO_CHARS = 1_500_000  # all of the stdlib docstrings (about 1.5M characters)
DEMO_VOCAB = 512


def add_arguments(p) -> None:
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--force", action="store_true", help="delete an existing --out first and start over")
    p.add_argument("--device", help="cpu, cuda, ... (default: CUDA when available)")
    p.add_argument("--quiet", action="store_true", help="only the final tables")
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
        _say(f"1. tokenizing {len(docs)} standard-library docstrings ({sum(map(len, docs)):,} characters)")
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prepare_data(lambda: iter(docs), prefix, vocab_size=DEMO_VOCAB, valid_fraction=0.05, force=True, quiet=quiet)
    else:
        _say(f"1. data already prepared in {prefix.parent}")
    return {"train": str(prefix), "valid": valid, "tokenizer": str(tokenizer)}


def run(args) -> int:
    import shutil

    from neox_progressive.family import load_family, plan_family
    from neox_progressive.family.report import plan_summary, plan_table
    from neox_progressive.runner import evaluate, summary
    from neox_progressive.runner.engines import BuiltinEngine
    from neox_progressive.runner.family_run import FamilyRun

    out = Path(args.out).resolve()
    if out.exists() and args.force:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    data = prepare(out, args.quiet)
    family = load_family(args.family, {
        "output_dir": str(out / "family"), "model": {"vocab_size": DEMO_VOCAB},
        "data": {"train": data["train"], "valid": data["valid"]},
        "shared": {"tokenizer_type": "SPMTokenizer", "vocab_file": data["tokenizer"]},
    })
    _say("2. the family's budgets (Eq. 4):")
    plan = plan_family(family, "progressive")
    print("\n".join(plan_table(plan) + plan_summary(plan)))
    engine = BuiltinEngine(device=args.device)
    runs = [FamilyRun(family, mode, engine, quiet=args.quiet, device=args.device) for mode in ("progressive", "independent")]
    for i, r in enumerate(runs):
        _say(f"3{'ab'[i]}. training the {r.mode} family with the builtin engine")
        r.run()
    _say("4. evaluating both families")
    report = evaluate.evaluate_runs(family, runs, quiet=args.quiet, device=args.device)
    results, names, plot = summary.summarize(runs, out / "loss_vs_flops.png")
    print("\nfinal validation losses:")
    print(summary.summary_text(results, names, plot, report))
    print("demo OK")
    return 0
