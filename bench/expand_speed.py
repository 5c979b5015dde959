"""Benchmark: expansion 1B -> 2B (Yano et al. 2025 App. A shapes, bf16) against the I/O floor, and peak memory.

Builds a synthetic bf16 NeoX checkpoint with the 1B member's shapes (hidden 2048, FFN 7168, 18 layers,
16 heads; GPT-2 vocab 50257 padded to 50304; random weights), expands it to the 2B shapes (2560, 8960,
22, 20) with the default options (AKI, b2b), and prints:

- wall time of `neox-progressive expand` (a fresh process, everything after `import torch` included:
  the plugin's imports, the source sha256 for expansion.json, fsync);
- the I/O floor measured in the same run, in another fresh process: torch.load (no mmap) of every
  source file plus torch.save + fsync of tensors of the output's file sizes;
- their ratio (target <= 1.3);
- peak RSS of the expansion process (getrusage) against 2 x the largest output layer file + 1 GiB.

`--layers` / `--dst-layers` shrink the depth (same widths) when time or disk is short; the report
says which depth ran.

    python bench/expand_speed.py --out bench/expand_speed.md
    python bench/expand_speed.py --layers 6 --dst-layers 8 --work /tmp/xb
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neox_progressive.config import ModelShape, neox_intermediate_size  # noqa: E402
from neox_progressive.io.writer import CheckpointWriter  # noqa: E402

ONE_B = dict(hidden_size=2048, ffn_size=7168, num_heads=16)
TWO_B = dict(hidden_size=2560, ffn_size=8960, num_heads=20)
VOCAB = 50304  # GPT-2's 50257 padded to a multiple of 128


def shape_of(widths: dict, layers: int) -> ModelShape:
    return ModelShape(num_layers=layers, num_kv_heads=widths["num_heads"], padded_vocab_size=VOCAB, mlp_multiple_of=64,
                      rms_norm_eps=1e-5, params_dtype="bfloat16", **widths)


def write_yaml(path: Path, shape: ModelShape) -> Path:
    cfg = shape.to_neox() | {"bf16": {"enabled": True}}
    assert cfg["intermediate_size"] == neox_intermediate_size(shape.ffn_size, 64)
    path.write_text(yaml.safe_dump(cfg))
    return path


def build_source(path: Path, shape: ModelShape) -> None:
    """A random bf16 checkpoint, one layer at a time (never the whole model in memory)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*s):
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    h, f, layers = shape.hidden_size, shape.ffn_size, shape.num_layers
    with CheckpointWriter(path, shape, force=True) as w:
        w.write_embed(rnd(VOCAB, h))
        for i in range(layers):
            w.write_layer(i, {"attn_norm.weight": torch.ones(h, dtype=torch.bfloat16), "attn.q.weight": rnd(h, h),
                              "attn.k.weight": rnd(h, h), "attn.v.weight": rnd(h, h), "attn.o.weight": rnd(h, h),
                              "mlp_norm.weight": torch.ones(h, dtype=torch.bfloat16), "mlp.gate.weight": rnd(f, h),
                              "mlp.up.weight": rnd(f, h), "mlp.down.weight": rnd(h, f)})
        w.write_final_norm(torch.ones(h, dtype=torch.bfloat16))
        w.write_head(rnd(VOCAB, h))


CHILD = """
import json, resource, sys, time
import torch  # both processes import torch before their clocks start
t0 = time.perf_counter()
from neox_progressive.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

FLOOR = """
import json, os, resource, sys, time
from pathlib import Path
import torch
from neox_progressive.io.safe import load_pt
src, out, sizes = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
buf = torch.randn(max(sizes) // 2).to(torch.bfloat16)
out.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
for f in sorted(src.glob("*.pt")):
    load_pt(f, mmap=False)
for i, n in enumerate(sizes):
    p = out / f"f{i}.pt"
    torch.save(buf[: n // 2].clone(), p)
    fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.close(fd)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def child(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=18, help="source layers (1B: 18)")
    ap.add_argument("--dst-layers", type=int, default=22, help="target layers (2B: 22)")
    ap.add_argument("--work", default="/tmp/expand_speed", help="scratch dir (needs ~3x the output size)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (a later run reuses the source)")
    ap.add_argument("--repeats", type=int, default=1, help="best of N runs of each, interleaved (shared machines are noisy)")
    ap.add_argument("--out", help="append the report (markdown) to this file")
    args = ap.parse_args()

    from neox_progressive.expand import plan_expansion

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src, dst = shape_of(ONE_B, args.layers), shape_of(TWO_B, args.dst_layers)
    src_yml, dst_yml = write_yaml(work / "src.yml", src), write_yaml(work / "dst.yml", dst)
    if not (work / "src" / "latest").exists():
        print(f"building the synthetic source ({src.param_count() * 2 / 2**30:.2f} GiB bf16) ...", file=sys.stderr)
        build_source(work / "src", src)
    plan = plan_expansion(src, dst, dtype="bfloat16")
    sizes = [plan.file_bytes[i] // dst.tp for i in sorted(plan.file_bytes)]
    largest_layer_file = max(sizes)

    runs, floors = [], []
    for _ in range(args.repeats):
        shutil.rmtree(work / "out", ignore_errors=True)
        runs.append(child(CHILD, "expand", "--src", str(work / "src"), "--src-config", str(src_yml), "--dst-config",
                          str(dst_yml), "--out", str(work / "out"), "--quiet"))
        out_bytes = sum(p.stat().st_size for p in (work / "out").rglob("*.pt"))
        shutil.rmtree(work / "out", ignore_errors=True)
        floors.append(child(FLOOR, str(work / "src" / "global_step0"), str(work / "floor"), json.dumps(sizes)))
        shutil.rmtree(work / "floor", ignore_errors=True)
    exp = min(runs, key=lambda r: r["seconds"]) | {"peak_rss": max(r["peak_rss"] for r in runs)}
    floor = min(floors, key=lambda r: r["seconds"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    all_runs = ", ".join(f"{r['seconds']:.1f}" for r in runs)
    all_floors = ", ".join(f"{r['seconds']:.1f}" for r in floors)
    gib = 2**30
    ratio = exp["seconds"] / floor["seconds"]
    rss_target = 2 * largest_layer_file + gib
    depth = "full depth" if (args.layers, args.dst_layers) == (18, 22) else "REDUCED depth"
    lines = [
        "",
        f"{dt.date.today()}, {platform.node() or 'machine'}: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, load average {load:.1f} at the end (shared machine), "
        f"`python bench/expand_speed.py --layers {args.layers} --dst-layers {args.dst_layers} --repeats {args.repeats}`",
        f"1B -> 2B widths (2048/7168/16 heads -> 2560/8960/20), {args.layers} -> {args.dst_layers} layers ({depth}), "
        f"bf16, vocab {VOCAB}, AKI + b2b; source {src.param_count() * 2 / gib:.2f} GiB, output {out_bytes / gib:.2f} GiB.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| expand wall time (best of {args.repeats}; all runs: {all_runs} s) | {exp['seconds']:.1f} s |",
        f"| I/O floor, all runs | {all_floors} s |",
        f"| I/O floor (load source + save output-size tensors + fsync), best | {floor['seconds']:.1f} s |",
        f"| ratio expand / floor (target <= 1.3) | {ratio:.2f} {'met' if ratio <= 1.3 else 'NOT met'} |",
        f"| peak RSS of expand | {exp['peak_rss'] / gib:.2f} GiB |",
        f"| largest output layer file | {largest_layer_file / gib:.3f} GiB |",
        f"| RSS target 2 x largest file + 1 GiB | {rss_target / gib:.2f} GiB: "
        f"{'met' if exp['peak_rss'] <= rss_target else 'NOT met'} |",
        f"| peak RSS of the floor process | {floor['peak_rss'] / gib:.2f} GiB |",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
