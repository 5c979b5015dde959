"""Benchmark: App. F KL over N documents between two members vs their forward passes alone (target <= 1.2x).

N documents of random lengths (uniform in [seq/8, seq] tokens; `--lengths full`: all seq tokens), random token ids, batched as the
evaluation batches them (longest first, right-padded, `batch` per batch). Three ways, each timed in
a fresh process (so peak RSS is its own):

- forward: both models' plain forward passes over the padded batches (full [B, T, V] logits),
  nothing else: the baseline;
- chunked: `neox_progressive.eval.kl.examples_kl`, what `eval` runs: both KL directions, top-1
  agreement and per-example values, by blocks of positions x vocabulary;
- dense:   full logits of both models, log-softmax, both directions and top-1 over the whole
  [B, T, V] tensors, masked per document (the naive way).

Time ratios are against `forward` measured in the same run: wall time, and the process's CPU time
(all threads), which other jobs on a shared machine disturb less. Memory: the peak of the resident
set (sampled every 2 ms) above its level once the models are built (CPU), or
torch.cuda.max_memory_allocated above the allocation after the build (GPU). The load average is
printed with the figures: they mean something only on a quiet machine.

    python bench/eval_speed.py --out bench/eval_speed.md          # CPU defaults: 50k vocab, 8 documents <= 512 tokens
    python bench/eval_speed.py --device cuda --n 256 --seq 2048 --small 1024x8 --large 2048x16
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neox_progressive.config import ModelShape  # noqa: E402
from neox_progressive.eval.kl import examples_kl  # noqa: E402
from neox_progressive.model import Transformer, init_weights  # noqa: E402


def build(spec: str, vocab: int, seq: int, seed: int, device) -> Transformer:
    h, layers = (int(x) for x in spec.split("x"))
    heads = max(1, h // 64)
    ffn = (8 * h // 3 + 63) // 64 * 64
    shape = ModelShape(hidden_size=h, num_layers=layers, num_heads=heads, num_kv_heads=heads, ffn_size=ffn,
                       padded_vocab_size=vocab, seq_length=seq, max_position_embeddings=seq)
    with torch.device(device):
        model = Transformer(shape)
    return init_weights(model, seed=seed).eval()


def rss_mb() -> float:
    """Current resident memory (Linux /proc), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakRSS:
    """Samples the resident memory every 2 ms in a thread; `.peak` is the highest value seen."""

    def __enter__(self):
        self.peak, self.stop = rss_mb(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(0.002):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, rss_mb())


def documents(args) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    lengths = (torch.randint(max(2, args.seq // 8), args.seq + 1, (args.n,), generator=g).tolist()
               if args.lengths == "random" else [args.seq] * args.n)
    return [torch.randint(0, args.vocab, (n,), generator=g) for n in lengths]


def padded_batches(docs, batch: int, device) -> list[tuple[torch.Tensor, list[int]]]:
    """As `examples_kl` batches them: longest first, right-padded."""
    docs = sorted(docs, key=len, reverse=True)
    out = []
    for s in range(0, len(docs), batch):
        group = docs[s:s + batch]
        x = torch.zeros(len(group), len(group[0]), dtype=torch.long)
        for i, d in enumerate(group):
            x[i, :len(d)] = d
        out.append((x.to(device), [len(d) for d in group]))
    return out


def dense(small, large, batches) -> list[float]:
    per = []
    for x, lens in batches:
        lp = torch.log_softmax(small(x).float(), -1)
        lq = torch.log_softmax(large(x).float(), -1)
        fwd = (lp.exp() * (lp - lq)).sum(-1)
        rev = (lq.exp() * (lq - lp)).sum(-1)
        top = (lp.argmax(-1) == lq.argmax(-1)).float()
        for b, n in enumerate(lens):
            per.append((float(fwd[b, :n].mean()), float(rev[b, :n].mean()), float(top[b, :n].mean())))
    return per


def measure(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    small = build(args.small, args.vocab, args.seq, 1, device)
    large = build(args.large, args.vocab, args.seq, 2, device)
    docs = documents(args)
    batches = padded_batches(docs, args.batch, device)

    def run():
        with torch.no_grad():
            if args.mode == "forward":
                for x, _ in batches:
                    small(x)
                    large(x)
            elif args.mode == "chunked":
                examples_kl(small, large, [d.to(device) for d in docs], batch_size=args.batch,
                            position_chunk=args.position_chunk or None, vocab_chunk=args.vocab_chunk or None)
            else:
                dense(small, large, batches)

    with torch.no_grad():  # warm-up on one batch
        small(batches[0][0][:1, :64])
        large(batches[0][0][:1, :64])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
    times, cpu = [], []
    with PeakRSS() as rss:
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else rss.peak - base
    return {"mode": args.mode, "seconds": min(times), "cpu_seconds": min(cpu), "peak_mb": peak,
            "tokens": sum(len(d) for d in docs)}


def child(args, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode] + [a for a in sys.argv[1:] if a not in ("--child",)]
    cmd += ["--n", str(args.n), "--seq", str(args.seq), "--vocab", str(args.vocab), "--batch", str(args.batch),
            "--small", args.small, "--large", args.large, "--device", args.device, "--repeats", str(args.repeats),
            "--position-chunk", str(args.position_chunk), "--vocab-chunk", str(args.vocab_chunk), "--lengths", args.lengths]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=8, help="documents")
    p.add_argument("--seq", type=int, default=512, help="the longest document (lengths uniform in [seq/8, seq])")
    p.add_argument("--lengths", choices=["random", "full"], default="random",
                   help="random: uniform in [seq/8, seq] (default); full: every document seq tokens, no padding, where "
                        "the forward passes waste nothing on padding (the strictest comparison)")
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--small", default="256x4", help="HIDDENxLAYERS of the smaller member")
    p.add_argument("--large", default="384x6", help="HIDDENxLAYERS of the larger member")
    p.add_argument("--position-chunk", type=int, default=0, help="rows per KL block (0: the default)")
    p.add_argument("--vocab-chunk", type=int, default=0, help="vocabulary columns per KL block (0: the default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the figures as markdown here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.mode = args.child
        print(json.dumps(measure(args)))
        return
    load_before = os.getloadavg()
    res = {m: child(args, m) for m in ("forward", "chunked", "dense")}
    load_after = os.getloadavg()
    base, base_cpu = res["forward"]["seconds"], res["forward"]["cpu_seconds"]
    lines = [
        "# eval_speed: KL over documents between two members vs their forward passes",
        "",
        f"{dt.date.today().isoformat()}, {platform.node() or 'machine'}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
        + f"; 1-minute load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
        + (" (a busy machine: the timings are disturbed)" if max(load_before[0], load_after[0]) > 0.5 * (os.cpu_count() or 1)
           else "") + ".",
        "",
        f"`python bench/eval_speed.py {' '.join(a for a in sys.argv[1:] if not a.startswith('--out') and a != args.out)}`: "
        f"{args.n} documents of {f'{args.seq // 8}-' if args.lengths == 'random' else ''}{args.seq} tokens "
        f"({res['forward']['tokens']} in all), vocab {args.vocab}, "
        f"batch {args.batch}, members {args.small} and {args.large} (hidden x layers), KL block "
        f"{args.position_chunk or 'default'} rows x {args.vocab_chunk or 'default'} columns, best of {args.repeats}.",
        "",
        "| way | wall seconds | x forward alone | CPU seconds | x forward alone (CPU) | peak memory growth (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for m in ("forward", "chunked", "dense"):
        r = res[m]
        lines.append(f"| {m} | {r['seconds']:.3f} | {r['seconds'] / base:.2f} | {r['cpu_seconds']:.3f} | "
                     f"{r['cpu_seconds'] / base_cpu:.2f} | {r['peak_mb']:.0f} |")
    ratio, ratio_cpu = res["chunked"]["seconds"] / base, res["chunked"]["cpu_seconds"] / base_cpu
    lines += ["", f"Chunked KL (both directions, top-1, per document) / forward alone = {ratio:.2f}x wall, "
              f"{ratio_cpu:.2f}x CPU (target <= 1.2x): {'met' if max(ratio, ratio_cpu) <= 1.2 else 'NOT met'}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
