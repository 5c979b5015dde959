"""Helpers for the family-runner tests: the tiny family on prepared stdlib data, as a file in tmp."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from neox_progressive.commands.demo import FAMILY_FILE
from neox_progressive.data.corpus import stdlib_corpus
from neox_progressive.data.prepare import prepare_data

ROOT = Path(__file__).resolve().parents[1]


def prepare_tiny_data(root: Path) -> dict:
    """All stdlib docstrings, a 512-piece SentencePiece model, 5% held out (what the demo prepares)."""
    docs = stdlib_corpus()
    res = prepare_data(lambda: iter(docs), root / "train", vocab_size=512, valid_fraction=0.05, quiet=True)
    return {"train": str(res.train_prefix), "valid": str(res.valid_prefix), "tokenizer": str(res.vocab_file)}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_family(path: Path, data: dict, out_dir: Path, **over) -> Path:
    """The tiny family with absolute data paths, `out_dir`, and nested overrides `over`."""
    raw = yaml.safe_load(FAMILY_FILE.read_text())
    raw = _merge(raw, {"output_dir": str(out_dir), "data": {"train": data["train"], "valid": data["valid"]},
                       "shared": {"vocab_file": data["tokenizer"], "tokenizer_type": "SPMTokenizer"}})
    raw["data"].pop("prepare", None)
    raw = _merge(raw, over)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# A small budget so that a whole family trains in seconds: half a token per parameter.
FAST = {"budget": {"tokens_per_param": 0.5}, "training": {"eval_interval": 20, "checkpoint_interval": 10, "log_interval": 5}}


def cli_process(*args: str, extra_code: str = "") -> subprocess.Popen:
    """`neox-progressive ARGS` in a subprocess (after `extra_code`), stderr merged into stdout, line-buffered text."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{extra_code}\n"
            f"from neox_progressive.cli import main\nsys.exit(main({list(args)!r}))")
    # the same thread count as this process: CPU matmuls are bit-reproducible only at equal thread counts
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
