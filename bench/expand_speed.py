"""Benchmark: expansion against the I/O floor, and peak memory, for both architectures (bf16).

`--arch llama` (default): Yano et al. 2025 App. A 1B -> 2B. A synthetic bf16 NeoX checkpoint with the 1B
member's shapes (hidden 2048, FFN 7168, 18 layers, 16 heads; GPT-2 vocab 50257 padded to 50304; random
weights) is expanded to the 2B shapes (2560, 8960, 22, 20).
`--arch neox`: NeoX's classic transformer, Pythia-1B-like (hidden 2048, 8 heads of 256, FFN 8192, 16
layers, LayerNorm with bias, GeLU, biases, gpt_j_residual, rotary_pct 0.25, vocab 50304) to twice its
width and depth (4096, 16 heads, FFN 16384, 32 layers).
Both use the default options (AKI, b2b). It prints:

- wall time of `neox-progressive expand` (a fresh process, everything after `import torch` included:
  the plugin's imports, the source sha256 for expansion.json, fsync);
- the I/O floor measured in the same run, in another fresh process: torch.load (no mmap) of every
  source file plus torch.save + fsync of tensors of the output's file sizes;
- their ratio (target <= 1.3);
- peak RSS of the expansion process (getrusage) against 2 x the largest output layer file + 1 GiB.

`--format hf` does the same for Hugging Face checkpoints (`expand --src HF_DIR`): the synthetic source is an
HF directory (config.json + safetensors, written by the plugin's HFWriter), the target an HF config.json,
the output an HF directory; the I/O floor is safetensors' load of every source tensor (`safe_open` +
`get_tensor(k).clone()`: get_tensor only maps the file, clone() reads it) plus `save_file` + fsync of
tensors of the output's per-layer sizes.

`--layers` / `--dst-layers` shrink the depth (same widths) when time or disk is short; the report
says which depth ran. `--compare DIR` also times the expansion with the package of another checkout
(e.g. the previous commit, `git worktree add /tmp/old HEAD~1`), interleaved with this one's runs, so
a before/after comparison sees the same machine load.

    python bench/expand_speed.py --out bench/expand_speed.md
    python bench/expand_speed.py --arch neox --repeats 2 --out bench/expand_speed.md
    python bench/expand_speed.py --format hf --repeats 3 --out bench/expand_speed.md
    python bench/expand_speed.py --layers 6 --dst-layers 8 --work /tmp/xb --compare /tmp/old
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

from neox_progressive import arch  # noqa: E402
from neox_progressive.config import ModelShape  # noqa: E402
from neox_progressive.io.writer import CheckpointWriter  # noqa: E402

VOCAB = 50304  # GPT-2's 50257 (Pythia: 50277) padded to a multiple of 128
ARCHS = {  # name: (source widths, target widths, default layers, default target layers, architecture fields, label)
    "llama": (dict(hidden_size=2048, ffn_size=7168, num_heads=16), dict(hidden_size=2560, ffn_size=8960, num_heads=20),
              18, 22, dict(rms_norm_eps=1e-5), "1B -> 2B widths (2048/7168/16 heads -> 2560/8960/20)"),
    "neox": (dict(hidden_size=2048, ffn_size=8192, num_heads=8), dict(hidden_size=4096, ffn_size=16384, num_heads=16),
             16, 32, dict(norm="layernorm", layernorm_eps=1e-5, activation="gelu", gelu_approx="tanh", attn_bias=True,
                          mlp_bias=True, parallel_residual=True, rotary_pct=0.25),
             "Pythia-1B-like classic transformer x2 widths (2048/8192/8 heads of 256 -> 4096/16384/16)"),
}


def shape_of(widths: dict, layers: int, fields: dict) -> ModelShape:
    return ModelShape(num_layers=layers, num_kv_heads=widths["num_heads"], padded_vocab_size=VOCAB, mlp_multiple_of=64,
                      params_dtype="bfloat16", **widths, **fields)


def write_yaml(path: Path, shape: ModelShape) -> Path:
    path.write_text(yaml.safe_dump(shape.to_neox() | {"bf16": {"enabled": True}}))
    return path


def build_source(path: Path, shape: ModelShape) -> None:
    """A random bf16 checkpoint of any architecture, one part at a time (never the whole model in memory)."""
    g = torch.Generator().manual_seed(0)

    def rnd(key, s):
        if key.endswith("norm.weight"):
            return torch.ones(s, dtype=torch.bfloat16)
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    glob = arch.logical_global_shapes(shape)
    with CheckpointWriter(path, shape, force=True) as w:
        for part in arch.GLOBAL_PARTS:
            w.write_part(part, {k: rnd(k, glob[k]) for k in arch.logical_part_keys(part, shape)})
        for i in range(shape.num_layers):
            w.write_layer(i, {k: rnd(k, s) for k, s in arch.logical_layer_shapes(shape).items()})


def build_hf_source(path: Path, shape: ModelShape) -> None:
    """A random bf16 HF directory (LlamaForCausalLM or GPTNeoXForCausalLM), one part at a time."""
    from neox_progressive.io.hf_writer import HFWriter

    g = torch.Generator().manual_seed(0)

    def rnd(key, s):
        if key.endswith("norm.weight"):
            return torch.ones(s, dtype=torch.bfloat16)
        return (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16)

    glob = arch.logical_global_shapes(shape)
    with HFWriter(path, shape, torch.bfloat16, force=True) as w:
        for part in arch.GLOBAL_PARTS:
            w.write_part(part, {k: rnd(k, glob[k]) for k in arch.logical_part_keys(part, shape)})
        for i in range(shape.num_layers):
            w.write_layer(i, {k: rnd(k, s) for k, s in arch.logical_layer_shapes(shape).items()})


HF_FLOOR = """
import json, os, resource, sys, time
from pathlib import Path
import torch
from safetensors import safe_open
from safetensors.torch import save_file
src, out, sizes = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
buf = torch.randn(max(sizes) // 2).to(torch.bfloat16)
out.mkdir(parents=True, exist_ok=True)
t0 = time.perf_counter()
for f in sorted(src.glob("*.safetensors")):
    with safe_open(str(f), framework="pt") as g:  # get_tensor maps the file lazily: clone() reads the data
        for k in g.keys():
            g.get_tensor(k).clone()
for i, n in enumerate(sizes):
    p = out / f"f{i}.safetensors"
    save_file({"t": buf[: n // 2].clone()}, str(p), metadata={"format": "pt"})
    fd = os.open(p, os.O_RDONLY); os.fsync(fd); os.close(fd)
print(json.dumps({"seconds": time.perf_counter() - t0,
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


CHILD = """
import json, resource, sys, time
import torch  # both processes import torch before their clocks start
t0 = time.perf_counter()
from neox_progressive.cli import main
u0 = resource.getrusage(resource.RUSAGE_SELF)
rc = main(sys.argv[1:])
u = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0, "peak_rss": u.ru_maxrss * 1024,
                  "cpu": u.ru_utime + u.ru_stime - u0.ru_utime - u0.ru_stime}))
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


def child(code: str, *args: str, root: Path = ROOT) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=list(ARCHS), default="llama", help="llama: 1B -> 2B (default); neox: Pythia-1B-like x2")
    ap.add_argument("--format", choices=["neox", "hf"], default="neox",
                    help="neox: NeoX checkpoints (default); hf: HF directories (expand --src HF_DIR, HF config.json target)")
    ap.add_argument("--layers", type=int, help="source layers (default: llama 18, neox 16)")
    ap.add_argument("--dst-layers", type=int, help="target layers (default: llama 22, neox 32)")
    ap.add_argument("--compare", metavar="DIR", help="also time the package of this checkout, interleaved (before/after)")
    ap.add_argument("--work", default="/tmp/expand_speed", help="scratch dir (needs ~3x the output size)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (a later run reuses the source)")
    ap.add_argument("--repeats", type=int, default=1, help="best of N runs of each, interleaved (shared machines are noisy)")
    ap.add_argument("--out", help="append the report (markdown) to this file")
    args = ap.parse_args()

    from neox_progressive.expand import plan_expansion

    src_w, dst_w, layers, dst_layers, fields, label = ARCHS[args.arch]
    args.layers, args.dst_layers = args.layers or layers, args.dst_layers or dst_layers
    hf_format = args.format == "hf"
    work = Path(args.work) / f"{args.arch}{'-hf' if hf_format else ''}-{args.layers}"  # a kept source is reused
    work.mkdir(parents=True, exist_ok=True)
    src, dst = shape_of(src_w, args.layers, fields), shape_of(dst_w, args.dst_layers, fields)
    src_yml, dst_yml = write_yaml(work / "src.yml", src), write_yaml(work / "dst.yml", dst)
    if hf_format:
        from neox_progressive.hf import hf_config

        dst_json = work / "dst.json"
        dst_json.write_text(json.dumps(hf_config(dst, torch.bfloat16)))
    if not (work / "src" / ("config.json" if hf_format else "latest")).exists():
        print(f"building the synthetic source ({src.param_count() * 2 / 2**30:.2f} GiB bf16) ...", file=sys.stderr)
        (build_hf_source if hf_format else build_source)(work / "src", src)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    plan = plan_expansion(src, dst, dtype="bfloat16")
    sizes = [plan.file_bytes[i] // dst.tp for i in sorted(plan.file_bytes)]
    largest_layer_file = max(sizes)

    runs, floors, others = [], [], []
    argv = ["expand", "--src", str(work / "src"), "--src-config", str(src_yml), "--dst-config", str(dst_yml),
            "--out", str(work / "out"), "--quiet"]
    if hf_format:
        argv = ["expand", "--src", str(work / "src"), "--dst-config", str(dst_json), "--out", str(work / "out"), "--quiet"]
    suffix = "*.safetensors" if hf_format else "*.pt"
    for _ in range(args.repeats):
        for root, into in ((ROOT, runs), *(((Path(args.compare), others),) if args.compare else ())):
            shutil.rmtree(work / "out", ignore_errors=True)
            into.append(child(CHILD, *argv, root=root))
        out_bytes = sum(p.stat().st_size for p in (work / "out").rglob(suffix))
        shutil.rmtree(work / "out", ignore_errors=True)
        floor_src = work / "src" if hf_format else work / "src" / "global_step0"
        floors.append(child(HF_FLOOR if hf_format else FLOOR, str(floor_src), str(work / "floor"), json.dumps(sizes)))
        shutil.rmtree(work / "floor", ignore_errors=True)
    exp = min(runs, key=lambda r: r["seconds"]) | {"peak_rss": max(r["peak_rss"] for r in runs)}
    other = min(others, key=lambda r: r["seconds"]) | {"peak_rss": max(r["peak_rss"] for r in others)} if others else None
    floor = min(floors, key=lambda r: r["seconds"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)

    all_runs = ", ".join(f"{r['seconds']:.1f}" for r in runs)
    other_runs = ", ".join(f"{r['seconds']:.1f}" for r in others)
    cpu_runs = ", ".join(f"{r['cpu']:.1f}" for r in runs)
    other_cpu = ", ".join(f"{r['cpu']:.1f}" for r in others)
    all_floors = ", ".join(f"{r['seconds']:.1f}" for r in floors)
    gib = 2**30
    ratio = exp["seconds"] / floor["seconds"]
    rss_target = 2 * largest_layer_file + gib
    depth = "full depth" if (args.layers, args.dst_layers) == (layers, dst_layers) else "REDUCED depth"
    lines = [
        "",
        f"{dt.date.today()}, {platform.node() or 'machine'}: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, load average {load_start:.1f} at the start, {load:.1f} at the end (shared machine), "
        f"`python bench/expand_speed.py --format {args.format} --arch {args.arch} --layers {args.layers} "
        f"--dst-layers {args.dst_layers} "
        f"--repeats {args.repeats}{' --compare ' + args.compare if args.compare else ''}`",
        f"{label}, {args.layers} -> {args.dst_layers} layers ({depth}), "
        f"bf16, vocab {VOCAB}, AKI + b2b, {'HF safetensors directories' if hf_format else 'NeoX checkpoints'}; "
        f"source {src.param_count() * 2 / gib:.2f} GiB, output {out_bytes / gib:.2f} GiB.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| expand wall time (best of {args.repeats}; all runs: {all_runs} s) | {exp['seconds']:.1f} s |",
        f"| expand CPU time, user + sys, all threads (all runs: {cpu_runs} s; less sensitive to load) | "
        f"{min(r['cpu'] for r in runs):.1f} s |",
        f"| I/O floor, all runs | {all_floors} s |",
        f"| I/O floor (load source + save output-size tensors + fsync{', safetensors' if hf_format else ''}), best | "
        f"{floor['seconds']:.1f} s |",
        f"| ratio expand / floor (target <= 1.3) | {ratio:.2f} {'met' if ratio <= 1.3 else 'NOT met'} |",
        f"| peak RSS of expand | {exp['peak_rss'] / gib:.2f} GiB |",
        f"| largest output layer file | {largest_layer_file / gib:.3f} GiB |",
        f"| RSS target 2 x largest file + 1 GiB | {rss_target / gib:.2f} GiB: "
        f"{'met' if exp['peak_rss'] <= rss_target else 'NOT met'} |",
        f"| peak RSS of the floor process | {floor['peak_rss'] / gib:.2f} GiB |",
    ]
    if other:
        lines += [
            f"| --compare {args.compare}: expand wall time (best; all runs: {other_runs} s) | {other['seconds']:.1f} s |",
            f"| --compare: ratio to the floor, peak RSS | {other['seconds'] / floor['seconds']:.2f}, "
            f"{other['peak_rss'] / gib:.2f} GiB |",
            f"| --compare: CPU time (all runs: {other_cpu} s) | {min(r['cpu'] for r in others):.1f} s |",
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
