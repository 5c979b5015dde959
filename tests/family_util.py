"""Helpers for the family tests: family files as dicts, written to a temp dir."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "neox"

# App. A of the paper: hidden, FFN, layers, heads, batch.
APP_A = {"1B": (2048, 7168, 18, 16, 960), "2B": (2560, 8960, 22, 20, 1920), "4B": (3200, 11200, 27, 25, 3840),
         "8B": (4096, 14336, 33, 32, 7680)}


def paper_family(tokens_per_param: float = 40, params: str = "nominal") -> dict:
    members = [{"name": n, "hidden_size": h, "ffn_size": f, "num_layers": L, "num_heads": a, "global_batch": b,
                "nominal_params": float(n[:-1]) * 1e9} for n, (h, f, L, a, b) in APP_A.items()]
    return {
        "name": "paper", "output_dir": "out", "members": members,
        "model": {"vocab_size": 50257, "seq_length": 1024, "mlp_multiple_of": 64},
        "budget": {"tokens_per_param": tokens_per_param, "params": params},
        "training": {"num_gpus": 64, "micro_batch": 5, "lr": {"rule": "fixed", "max": 3.0e-4}},
        "data": {"train": "data/train", "valid": "data/valid"},
    }


def tiny_family() -> dict:
    return {
        "name": "tiny", "output_dir": "out",
        "members": [{"name": "s", "hidden_size": 32, "ffn_size": 64, "num_layers": 2, "num_heads": 4, "global_batch": 8},
                    {"name": "m", "hidden_size": 48, "ffn_size": 96, "num_layers": 3, "num_heads": 6, "global_batch": 8},
                    {"name": "l", "hidden_size": 64, "ffn_size": 128, "num_layers": 4, "num_heads": 8, "global_batch": 16}],
        "model": {"vocab_size": 512, "seq_length": 64, "make_vocab_size_divisible_by": 64, "pipe_parallel_size": 0},
        "budget": {"tokens_per_param": 2},
        "training": {"num_gpus": 1, "micro_batch": 8, "precision": "fp32", "zero_stage": 0,
                     "lr": {"rule": "fixed", "max": 0.01, "warmup": 0.05}},
        "data": {"train": "data/train", "valid": "data/valid"},
    }


def write_family(tmp: Path, data: dict, name: str = "family.yml") -> Path:
    path = Path(tmp) / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def changed(data: dict, **paths) -> dict:
    """A deep copy with dotted keys replaced: changed(d, **{"budget.tokens_per_param": 20})."""
    out = copy.deepcopy(data)
    for dotted, value in paths.items():
        node = out
        *parents, last = dotted.split(".")
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        node[int(last) if last.isdigit() else last] = value
    return out
