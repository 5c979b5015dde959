"""Helpers for the data and training tests: a tiny real-text dataset and stage YAML files."""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml

from neox_progressive.config import ModelShape
from neox_progressive.data.corpus import stdlib_corpus
from neox_progressive.data.prepare import prepare_data

VOCAB = 512


def make_data(root: Path, n_chars: int = 120_000, vocab: int = VOCAB) -> dict:
    """Stdlib docstrings -> a trained SentencePiece model, a training and a validation dataset."""
    docs = stdlib_corpus(n_chars)
    res = prepare_data(lambda: iter(docs), root / "train", vocab_size=vocab, valid_fraction=0.1, quiet=True)
    return {"train": res.train_prefix, "valid": res.valid_prefix, "tokenizer": res.vocab_file, "docs": docs, "result": res}


def tiny_shape(**kw) -> ModelShape:
    base = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=64, padded_vocab_size=None,
                rms_norm_eps=1e-5, seq_length=32, max_position_embeddings=32, pp=1, tp=1)
    base.update(kw)
    return ModelShape(**base)


def stage_config(data: dict, save: Path | None = None, shape: ModelShape | None = None, **over) -> dict:
    cfg = (shape or tiny_shape()).to_neox()
    cfg.update({
        "tokenizer_type": "SPMTokenizer", "vocab_file": data["tokenizer"], "data_impl": "mmap",
        "train_data_paths": [data["train"]], "valid_data_paths": [data["valid"]],
        "optimizer": {"type": "Adam", "params": {"lr": 0.01, "betas": [0.9, 0.95], "eps": 1.0e-8}},
        "min_lr": 0.001, "lr_decay_style": "cosine", "warmup": 0.1, "weight_decay": 0.01, "gradient_clipping": 1.0,
        "train_iters": 20, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
        "eval_interval": 10, "eval_iters": 2, "log_interval": 5, "seed": 3, "use_wandb": False,
    })
    if save is not None:
        cfg.update({"save": str(save), "checkpoint_factor": 10})
    cfg.update(over)
    return {k: v for k, v in cfg.items() if v is not None}


def write_stage(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def checksums(tag_dir: Path) -> dict[str, str]:
    """sha256 of the NeoX model files of a checkpoint (not the configs, not our state file)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(tag_dir).glob("*model_states.pt"))}
