"""NeoX's arguments as data, and the validator of NeoX YAML files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neox_progressive.neox_args import known_args, source_commit, type_problem, validate_config, validate_files
from neox_progressive.neox_args.validator import DATA

REPO = Path(__file__).resolve().parents[1]


def _good() -> dict:
    return {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 64, "max_position_embeddings": 64,
            "train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4,
            "pipe_parallel_size": 1, "model_parallel_size": 1, "global_num_gpus": 2, "train_iters": 100,
            "lr_decay_iters": 100, "lr_decay_style": "cosine", "warmup": 0.01, "min_lr": 1.0e-5,
            "optimizer": {"type": "Adam", "params": {"lr": 1.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8}},
            "precision": "bfloat16", "zero_optimization": {"stage": 1}, "save": "ckpt", "checkpoint_factor": 10}


def test_data_file_facts():
    args = known_args()
    assert source_commit().startswith("ea7aefd8")
    assert args["train_iters"]["type"] == {"kind": "int"}
    assert args["gradient_accumulation_steps"]["default"] == 1  # NEOX_FACTS: defaults to 1, not derived
    assert set(args["lr_decay_style"]["type"]["choices"]) == {"constant", "linear", "cosine", "exponential"}
    assert args["rms_norm_epsilon"]["default"] == 1.0e-8
    assert args["use_wandb"]["type"] == {"kind": "bool"}
    assert len(args) > 300


@pytest.mark.neox
def test_data_file_regenerates_from_neox_source(tmp_path):
    """The argument data equals what the tool extracts from the NeoX checkout in NEOX_DIR (a commit ea7aefd8 tree)."""
    out = tmp_path / "args.json"
    subprocess.run([sys.executable, str(REPO / "tools" / "extract_neox_args.py"), os.environ["NEOX_DIR"], "tree",
                    "--out", str(out)], check=True, capture_output=True)
    got, want = json.loads(out.read_text()), json.loads(DATA.read_text())
    assert got["source"]["files"] == want["source"]["files"]
    assert got["args"] == want["args"], "neox_args.json differs from NEOX_DIR's NeoX: not at ea7aefd8, or the data is stale"


def test_good_config_passes():
    assert validate_config(_good()) == []


@pytest.mark.parametrize("key, value, words", [
    ("hiden_size", 32, ["unknown NeoX key", "did you mean 'hidden_size'"]),
    ("train_iters", 100.0, ["integer", "100"]),
    ("rotary_emb_base", 1.0e4, ["integer"]),
    ("use_wandb", "false", ["bool"]),
    ("lr_decay_style", "cosin", ["one of"]),
    ("min_lr", "1e-5", ["PyYAML", "string"]),
    ("attention_dropout", "1e-1", ["PyYAML"]),
])
def test_type_problems(key, value, words):
    msg = type_problem(key, value)
    assert msg is not None
    for w in words:
        assert w in msg


def test_types_neox_accepts():
    assert type_problem("min_lr", 0) is None  # an int in a float field
    assert type_problem("lr_decay_style", "COSINE") is None  # Literal compare is case-insensitive
    assert type_problem("precision", "BFloat16") is None
    assert type_problem("checkpoint_factor", 2.5) is None and type_problem("checkpoint_factor", 10) is None  # Union
    assert type_problem("vocab_file", None) is None


@pytest.mark.parametrize("change, words", [
    ({"train_batch_size": 32}, ["batch triple", "32"]),
    ({"global_num_gpus": 4}, ["batch triple"]),
    ({"model_parallel_size": 2}, ["batch triple", "data-parallel 1"]),
    ({"zero_optimization": None}, ["zero_optimization"]),
    ({"train_iters": 101}, ["cosine", "lr_decay_iters"]),
    ({"warmup": 0.001}, ["warmup", "< 1"]),
    ({"min_lr": 1.0}, ["min_lr"]),
    ({"checkpoint_factor": None}, ["checkpoint_factor"]),
    ({"max_position_embeddings": 32}, ["max_position_embeddings"]),
    ({"optimizer": {"type": "Adam", "params": {"lr": "1e-4"}}}, ["optimizer.lr", "string"]),
    ({"optimizer": {"params": {"lr": 1.0e-4}}}, ["optimizer"]),
])
def test_value_problems(change, words):
    cfg = _good()
    for k, v in change.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    problems = validate_config(cfg)
    assert problems, change
    text = " | ".join(problems)
    for w in words:
        assert w in text, text


def test_bf16_block_form_needs_zero_too():
    cfg = _good()
    del cfg["precision"], cfg["zero_optimization"]
    cfg["bf16"] = {"enabled": True}
    assert any("zero_optimization" in p for p in validate_config(cfg))


def test_files_key_repeated_and_yaml_strings(tmp_path):
    a, b = tmp_path / "a.yml", tmp_path / "b.yml"
    cfg = _good()
    a.write_text(yaml.safe_dump(cfg))
    b.write_text("train-iters: 100\n")  # dashes are the same key for NeoX
    problems = validate_files([a, b])
    assert any("both" in p and "train_iters" in p for p in problems)
    a.write_text(yaml.safe_dump({**cfg, "min_lr": 0.0}).replace("min_lr: 0.0", "min_lr: 1e-5"))
    assert any("PyYAML" in p for p in validate_files([a]))
    assert validate_files([a.with_name("none.yml")])[0].endswith("does not exist")
