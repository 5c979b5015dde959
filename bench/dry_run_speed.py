"""Benchmark: `neox-progressive expand --dry-run` over the paper's family (Yano et al. 2025 App. A: 1B -> 2B -> 4B -> 8B).

A dry run plans every expansion from the configs alone (no weights are read or written), so it should take
seconds: the target is under 10 s for the three steps in one process. Prints the time of each step and the
total, in-process (the CLI's `main`, after the imports) and for one fresh process (imports included).
This used to be an assert in tests/test_expand_cli.py; timings live here, not in tests.

    python bench/dry_run_speed.py
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neox_progressive.cli import main  # noqa: E402
from neox_progressive.config import neox_intermediate_size  # noqa: E402

# App. A: hidden, FFN, layers, heads
FAMILY = {"1B": (2048, 7168, 18, 16), "2B": (2560, 8960, 22, 20), "4B": (3200, 11200, 27, 25), "8B": (4096, 14336, 33, 32)}
TARGET_S = 10.0


def config(tmp: Path, name: str, vocab: Path) -> Path:
    h, f, layers, heads = FAMILY[name]
    cfg = {"num_layers": layers, "hidden_size": h, "num_attention_heads": heads,
           "intermediate_size": neox_intermediate_size(f, 64), "mlp_multiple_of": 64, "seq_length": 2048,
           "max_position_embeddings": 2048, "pos_emb": "rotary", "norm": "rmsnorm", "rms_norm_epsilon": 1e-5,
           "activation": "swiglu", "no_weight_tying": True, "use_bias_in_attn_linear": False, "use_bias_in_mlp": False,
           "make_vocab_size_divisible_by": 128, "tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(vocab),
           "bf16": {"enabled": True}}
    path = tmp / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def argv(tmp: Path, a: str, b: str, vocab: Path) -> list[str]:
    return ["expand", "--src", str(tmp / f"{a}_ckpt"), "--src-config", str(config(tmp, a, vocab)),
            "--dst-config", str(config(tmp, b, vocab)), "--out", str(tmp / f"{b}_expanded"), "--dry-run",
            "--format", "json", "--stage", b]


def main_bench() -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        vocab = tmp / "vocab.json"
        vocab.write_text(json.dumps({f"t{i}": i for i in range(50257)}))
        names = list(FAMILY)
        total = 0.0
        for a, b in zip(names, names[1:]):
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                assert main(argv(tmp, a, b, vocab)) == 0
            dt = time.perf_counter() - t0
            total += dt
            print(f"{a} -> {b}: {dt:.2f} s")
        print(f"in-process total: {total:.2f} s (target < {TARGET_S:.0f} s): {'met' if total < TARGET_S else 'NOT met'}")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "neox_progressive", *argv(tmp, "1B", "2B", vocab)], check=True,
                       capture_output=True, cwd=ROOT)
        print(f"one fresh process (1B -> 2B, imports included): {time.perf_counter() - t0:.2f} s")


if __name__ == "__main__":
    main_bench()
