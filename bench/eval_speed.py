"""Benchmark: App. F KL between two members vs the forward passes alone (target <= 1.2x), and peak memory.

Three ways over the same N sequences, each timed in a fresh process (so peak RSS is its own):

- forward: both models' plain forward passes (full [B, T, V] logits), nothing else: the baseline;
- chunked: `neox_progressive.eval.kl.pair_kl` (trunks once, head + KL `position_chunk` rows at a time);
- dense:   full logits of both models, log-softmax, KL over the whole [B, T, V] tensors (the naive way).

Time ratios are against `forward` measured in the same run. Memory: the peak of the resident set
(sampled every 2 ms) above its level once the models are built (CPU), or torch.cuda.max_memory_allocated
above the allocation after the build (GPU).

    python bench/eval_speed.py --out bench/eval_speed.md          # CPU defaults: 50k vocab, 8 x 512 tokens
    python bench/eval_speed.py --device cuda --n 64 --seq 2048 --small 1024x8 --large 2048x16
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
from neox_progressive.eval.kl import pair_kl  # noqa: E402
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


def measure(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    small = build(args.small, args.vocab, args.seq, 1, device)
    large = build(args.large, args.vocab, args.seq, 2, device)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
               for _ in range(args.n // args.batch)]

    def run():
        with torch.no_grad():
            if args.mode == "forward":
                for x in batches:
                    small(x)
                    large(x)
            elif args.mode == "chunked":
                pair_kl(small, large, batches, position_chunk=args.position_chunk or None)
            else:
                for x in batches:
                    lp = torch.log_softmax(small(x).float(), -1)
                    lq = torch.log_softmax(large(x).float(), -1)
                    (lp.exp() * (lp - lq)).sum(-1).mean(-1)

    with torch.no_grad():  # warm-up on one batch
        small(batches[0][:1, :64])
        large(batches[0][:1, :64])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_mb()
    times = []
    with PeakRSS() as rss:
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else rss.peak - base
    return {"mode": args.mode, "seconds": min(times), "peak_mb": peak}


def child(args, mode: str) -> dict:
    cmd = [sys.executable, __file__, "--child", mode] + [a for a in sys.argv[1:] if a not in ("--child",)]
    cmd += ["--n", str(args.n), "--seq", str(args.seq), "--vocab", str(args.vocab), "--batch", str(args.batch),
            "--small", args.small, "--large", args.large, "--device", args.device, "--repeats", str(args.repeats),
            "--position-chunk", str(args.position_chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n", type=int, default=8, help="sequences")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--small", default="256x4", help="HIDDENxLAYERS of the smaller member")
    p.add_argument("--large", default="384x6", help="HIDDENxLAYERS of the larger member")
    p.add_argument("--position-chunk", type=int, default=0, help="0: the default (a 64 MB logits block)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the figures as markdown here")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.mode = args.child
        print(json.dumps(measure(args)))
        return
    res = {m: child(args, m) for m in ("forward", "chunked", "dense")}
    base = res["forward"]["seconds"]
    lines = [
        "# eval_speed: KL between two members vs their forward passes",
        "",
        f"{dt.date.today().isoformat()}, {platform.node() or 'machine'}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "") + ".",
        "",
        f"`python bench/eval_speed.py {' '.join(a for a in sys.argv[1:] if not a.startswith('--out') and a != args.out)}`: "
        f"{args.n} sequences x {args.seq} tokens, vocab {args.vocab}, batch {args.batch}, members {args.small} and "
        f"{args.large} (hidden x layers), position chunk {args.position_chunk or 'default'}, best of {args.repeats}.",
        "",
        "| way | seconds | x forward alone | peak memory growth (MB) |",
        "|---|---|---|---|",
    ]
    for m in ("forward", "chunked", "dense"):
        r = res[m]
        lines.append(f"| {m} | {r['seconds']:.3f} | {r['seconds'] / base:.2f} | {r['peak_mb']:.0f} |")
    ratio = res["chunked"]["seconds"] / base
    lines += ["", f"Chunked KL / forward alone = {ratio:.2f}x (target <= 1.2x): {'met' if ratio <= 1.2 else 'NOT met'}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
