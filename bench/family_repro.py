"""Benchmark (needs a GPU): the paper's comparison at small scale with the builtin engine.

A 4-member family, sizes doubling from about 10M to 80M parameters (Llama-style, head_dim 64), is
trained twice at the paper's budgets: progressive (Eq. 4: the family costs what the largest member
costs from scratch, 0.75x of independent for doubling sizes) and independent (each member from
scratch at tokens_per_param x params). Prints per member the final validation loss of both
families and, for the largest member, the cumulative FLOPs at which progressive reaches
independent's final loss (paper Fig. 2: progressive gets there with fewer FLOPs).

Data: `--data PREFIX` (+ `--valid PREFIX`, `--tokenizer FILE`): a NeoX mmap dataset of your own with
enough tokens (20 tokens/param: 1.6B tokens for the largest member; progressive reads fresh windows,
so 1.28x that for the family); without it, the Python standard-library docstrings (about 0.8M
tokens at a 512-piece vocabulary) with the family's fixed-data cap, i.e. many epochs: fine to check
the machinery, not a faithful reproduction.

    python bench/family_repro.py --device cuda --out bench_runs/family_repro          # stdlib data
    python bench/family_repro.py --device cuda --data /data/pile_train --valid /data/pile_valid \\
        --tokenizer /data/tokenizer.json --vocab-size 50304 --tokens-per-param 20
    python bench/family_repro.py --smoke --device cpu --out /tmp/fr                    # minutes on CPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, hidden, ffn, layers, heads): about 10M, 20M, 40M, 80M non-embedding parameters
MEMBERS = [("10M", 256, 688, 12, 4), ("20M", 320, 864, 16, 5), ("40M", 448, 1216, 16, 7), ("80M", 576, 1536, 20, 9)]
SMOKE = [("s", 32, 96, 1, 1), ("m", 32, 96, 2, 1), ("l", 64, 176, 2, 2), ("xl", 64, 176, 4, 2)]


def family_file(args, out: Path, data: dict) -> Path:
    members = SMOKE if args.smoke else MEMBERS
    fam = {
        "name": "family_repro", "mode": "progressive", "output_dir": str(out / "runs"),
        "model": {"vocab_size": data["vocab_size"], "seq_length": args.seq, "make_vocab_size_divisible_by": 64,
                  "pipe_parallel_size": 0},
        "members": [{"name": n, "hidden_size": h, "ffn_size": f, "num_layers": L, "num_heads": a, "global_batch": args.batch}
                    for n, h, f, L, a in members],
        "budget": {"tokens_per_param": args.tokens_per_param, "params": "computed", "fixed_data": data["fixed"]},
        "training": {"num_gpus": 1, "micro_batch": args.micro_batch, "precision": "bfloat16" if args.device != "cpu" else "fp32",
                     "zero_stage": 0, "lr": {"rule": "size_scaled", "smallest": args.lr_small, "largest": args.lr_large,
                                             "min_ratio": 0.1, "warmup": args.warmup, "decay_style": "cosine"},
                     "checkpoint_interval": 100000, "eval_interval": args.eval_interval, "eval_iters": args.eval_iters,
                     "log_interval": 50, "init_method": "small_init", "output_layer_init_method": "wang_init"},
        "data": {"train": data["train"], "valid": data["valid"]},
        "expansion": {"method": "aki", "depth_rule": "b2b", "seed": 0},
        "eval": {"enabled": False},
        "wandb": {"enabled": False},
        "shared": {"tokenizer_type": data["tokenizer_type"], "vocab_file": data["tokenizer"]},
    }
    path = out / "family_repro.yml"
    path.write_text(yaml.safe_dump(fam, sort_keys=False))
    return path


def stdlib_data(out: Path) -> dict:
    from neox_progressive.data import dataset_exists, stdlib_corpus
    from neox_progressive.data.prepare import prepare_data

    prefix = out / "data" / "stdlib"
    if not dataset_exists(prefix):
        docs = stdlib_corpus()
        prefix.parent.mkdir(parents=True, exist_ok=True)
        prepare_data(lambda: iter(docs), prefix, vocab_size=512, valid_fraction=0.02, force=True)
    return {"train": str(prefix), "valid": str(prefix) + "_valid", "tokenizer": str(prefix) + ".tokenizer.model",
            "tokenizer_type": "SPMTokenizer", "vocab_size": 512, "fixed": False}


def repeated(prefix: str, tokens: int) -> str:
    """The dataset repeated (whole epochs, in order) until it holds `tokens` tokens: small corpora only."""
    import math

    from neox_progressive.data import MMapDataset, dataset_exists, write_dataset

    src = MMapDataset(prefix)
    n = int(sum(len(src[i]) for i in range(len(src))))
    k = max(1, math.ceil(tokens / n))
    out = f"{prefix}_x{k}"
    if k > 1 and not dataset_exists(out):
        write_dataset(out, (src[i] for _ in range(k) for i in range(len(src))), vocab_size=512)
    return out if k > 1 else prefix


def reach_flops(curve: dict, target: float) -> float | None:
    """The first cumulative FLOPs at which `curve` reaches loss <= target (linear between evaluations)."""
    pts = list(zip(curve["flops"], curve["loss"]))
    for (f0, l0), (f1, l1) in zip(pts, pts[1:]):
        if l0 <= target:
            return f0
        if l1 <= target:  # l0 > target >= l1
            return f0 + (f1 - f0) * (l0 - target) / (l0 - l1)
    return pts[-1][0] if pts and pts[-1][1] <= target else None


def report(args, results: dict, names: list[str], plan_saving: float) -> str:
    from neox_progressive.runner.summary import loss_curves

    curves = loss_curves(results, names)
    prog = {c["member"]: c for c in curves.get("progressive", [])}
    ind = {c["member"]: c for c in curves.get("independent", [])}
    dev = args.device
    try:
        import torch

        if dev.startswith("cuda") and torch.cuda.is_available():
            dev = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    lines = [f"{dt.date.today()}, {platform.node()}, {dev}; `{' '.join(sys.argv)}`", "",
             f"planned saving of progressive vs independent: {plan_saving:.1%}", "",
             "| member | progressive final valid loss | independent final valid loss | progressive cumulative FLOPs | "
             "independent FLOPs |", "|---|---:|---:|---:|---:|"]
    for n in names:
        p, i = prog.get(n), ind.get(n)
        lines.append(f"| {n} | {p['loss'][-1]:.4f} | {i['loss'][-1]:.4f} | {p['flops'][-1]:.3e} | {i['flops'][-1]:.3e} |"
                     if p and i else f"| {n} | - | - | - | - |")
    big = names[-1]
    if big in prog and big in ind:
        target = ind[big]["loss"][-1]
        at = reach_flops(prog[big], target)
        lines += ["", f"largest member {big}: independent ends at loss {target:.4f} after {ind[big]['flops'][-1]:.3e} FLOPs; "
                  + (f"progressive reaches it at {at:.3e} cumulative FLOPs ({at / ind[big]['flops'][-1]:.2f}x)" if at
                     else "progressive does not reach it")]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench_runs/family_repro")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data"), ap.add_argument("--valid"), ap.add_argument("--tokenizer")
    ap.add_argument("--tokenizer-type", default="HFTokenizer")
    ap.add_argument("--vocab-size", type=int, help="the tokenizer's size (with --data)")
    ap.add_argument("--tokens-per-param", type=float, default=20.0)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=32)
    ap.add_argument("--lr-small", type=float, default=1.0e-3)
    ap.add_argument("--lr-large", type=float, default=6.0e-4)
    ap.add_argument("--warmup", type=float, default=0.01, help="NeoX's warmup fraction (>= 1 iteration for every member)")
    ap.add_argument("--eval-interval", type=int, default=200)
    ap.add_argument("--eval-iters", type=int, default=10)
    ap.add_argument("--smoke", action="store_true", help="tiny members and budgets: checks the machinery in minutes")
    ap.add_argument("--md", help="append the report to this markdown file")
    args = ap.parse_args()
    if args.smoke:
        args.tokens_per_param, args.seq, args.batch, args.micro_batch, args.eval_interval, args.warmup = 0.5, 64, 8, 8, 20, 0.05
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        if not (args.valid and args.tokenizer and args.vocab_size):
            ap.error("--data needs --valid, --tokenizer and --vocab-size")
        data = {"train": args.data, "valid": args.valid, "tokenizer": args.tokenizer, "tokenizer_type": args.tokenizer_type,
                "vocab_size": args.vocab_size, "fixed": False}
    else:
        data = stdlib_data(out)
    fam = family_file(args, out, data)
    if not args.data:  # a small corpus: enough whole epochs of it for both families' windows
        from neox_progressive.family import load_family, plan_family

        family = load_family(fam)
        need = max(plan_family(family, m).stream_tokens for m in ("progressive", "independent"))
        data["train"] = repeated(data["train"], need + 1)
        fam = family_file(args, out, data)
    subprocess.run([sys.executable, "-m", "neox_progressive", "plan", str(fam)], check=True, cwd=ROOT)
    cmd = [sys.executable, "-m", "neox_progressive", "run", str(fam), "--mode", "both", "--engine", "builtin",
           "--device", args.device, "--no-eval", "--quiet", "--format", "json"]
    done = subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    results = json.loads(done.stdout)["results"]
    from neox_progressive.family import load_family, plan_family

    family = load_family(fam)
    text = report(args, results, [m.name for m in family.members], plan_family(family, "progressive").saving)
    print(text)
    if args.md:
        with open(args.md, "a") as fh:
            fh.write("\n" + text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
