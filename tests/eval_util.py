"""Helpers for the evaluation tests: a real BPE tokenizer trained on stdlib text, tiny members on disk, HF exports."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny import random_sd, tiny_shape, write_yaml

from neox_progressive.config import ModelShape
from neox_progressive.eval.member import Member
from neox_progressive.eval.tasks import stdlib_paragraphs
from neox_progressive.io.writer import write_checkpoint

EOT = "<|endoftext|>"


def bpe_tokenizer(path: Path, vocab_size: int = 300) -> Path:
    """A byte-level BPE trained on standard-library docstrings, `<|endoftext|>` = id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_paragraphs()[:300], trainer)
    tok.save(str(path))
    return path


def make_member(root: Path, name: str, tokenizer: Path, seed: int = 0, std: float = 0.15, family: str = "family",
                **shape_kw) -> Member:
    """A member with random weights: NeoX checkpoint + YAML naming the tokenizer (vocab padded to 64)."""
    root.mkdir(parents=True, exist_ok=True)
    shape = tiny_shape(**{"make_vocab_size_divisible_by": 64, **shape_kw})
    cfg = write_yaml(root / f"{name}.yml", shape, tokenizer_type="HFTokenizer", vocab_file=str(tokenizer))
    shape = ModelShape.from_yamls([cfg])
    write_checkpoint(root / name, shape, random_sd(shape, seed=seed, std=std))
    return Member(name=name, checkpoint=root / name, configs=[cfg], family=family)


def hf_export(member: Member, out: Path) -> Path:
    """LlamaForCausalLM dir + a fast tokenizer (eos = <|endoftext|>) that lm-eval's HFLM can load."""
    from transformers import PreTrainedTokenizerFast

    from neox_progressive.hf import export_hf

    eot = member.tokenizer.eot_id
    export_hf(member.reader, out, eos=eot, bos=eot)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(member.tokenizer.path), eos_token=EOT, bos_token=EOT)
    tok.save_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == member.shape.padded_vocab_size
    return out


def hf_model(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()
