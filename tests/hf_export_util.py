"""Helpers for the tests of the tokenizer in HF exports: tiny tokenizers trained here (no downloads), members
whose NeoX config names them, `export-hf` through the CLI, and the checks that run under the current
transformers / lm-eval and, in NeoX's virtualenv, under transformers 4.38 / lm-eval 0.4.1."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from tiny import random_sd, tiny_shape, write_yaml

from neox_progressive.config import ModelShape
from neox_progressive.eval.tasks import stdlib_paragraphs
from neox_progressive.io.writer import write_checkpoint

EOT = "<|endoftext|>"
# double spaces, newlines, tabs, non-ASCII, leading / trailing whitespace, empty text
TEXTS = ["Hello  world", "two\n\nnewlines\nand one", "\tTabbed\ttext\t", "  leading and trailing  ", "", " ", "\n",
         "naïve café — Ωμέγα, 日本語 and 😀 emoji", "mixed \t \n whitespace   runs", "x" * 40, "ends with a newline\n",
         "Zero\u200bwidth and non\u00a0breaking space", "numbers 1234567 and symbols {}|~^"]


def texts() -> list[str]:
    paras = stdlib_paragraphs()[:60]
    return TEXTS + paras[:20] + ["\n\n".join(paras[20:40]), "\t".join(paras[40:60])]


def spm_tokenizer(path: Path, model_type: str = "bpe", vocab_size: int = 400) -> Path:
    """The plugin's own SentencePiece training (prepare-data's): identity normalization, `\\n` piece, byte fallback."""
    from neox_progressive.data.tokenizer import train_sentencepiece

    return train_sentencepiece(stdlib_paragraphs()[:400], vocab_size, path, model_type=model_type)


def spm_raw(path: Path, **options) -> Path:
    """A SentencePiece model trained with the library's own defaults (nmt_nfkc, extra whitespace removed), plus options."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(stdlib_paragraphs()[:400]), model_writer=model, num_threads=1,
                                   minloglevel=2, **{"vocab_size": 400, **options})
    path.write_bytes(model.getvalue())
    return path


def gpt2_files(root: Path, vocab_size: int = 400) -> tuple[Path, Path]:
    """GPT-2 style vocab.json + merges.txt (byte-level BPE with <|endoftext|>), as NeoX's GPT2BPETokenizer reads them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(stdlib_paragraphs()[:400], trainer)
    root.mkdir(parents=True, exist_ok=True)
    vocab, merges = tok.model.save(str(root))
    return Path(vocab), Path(merges)


def member(root: Path, name: str, tokenizer: dict, seed: int = 0, std: float = 0.1, **shape_kw) -> tuple[Path, Path]:
    """A NeoX checkpoint with random weights + its YAML naming `tokenizer` (tokenizer_type, vocab_file, ...)."""
    root.mkdir(parents=True, exist_ok=True)
    shape = tiny_shape(**{"make_vocab_size_divisible_by": 64, "padded_vocab_size": None, **shape_kw})
    yml = write_yaml(root / f"{name}.yml", shape, **tokenizer)
    shape = ModelShape.from_yamls([yml])
    write_checkpoint(root / name, shape, random_sd(shape, seed=seed, std=std))
    return root / name, yml


def export(ck: Path, yml: Path, out: Path, *extra: str) -> Path:
    from neox_progressive.cli import main

    code = main(["export-hf", str(ck), "--config", str(yml), "--out", str(out), "--quiet", *extra])
    assert code == 0
    return out


def spm_family(root: Path) -> dict[str, Path]:
    """Two members (small, large) sharing a SentencePiece tokenizer, their configs and HF exports."""
    tok = spm_tokenizer(root / "spm.model")
    cfg = {"tokenizer_type": "SPMTokenizer", "vocab_file": str(tok)}
    small_ck, small_yml = member(root, "small", cfg, seed=1, std=0.25, num_kv_heads=2)
    large_ck, large_yml = member(root, "large", cfg, seed=2, std=0.25, hidden_size=48, num_heads=6, num_kv_heads=3,
                                 num_layers=3, ffn_size=64)
    return {"tokenizer": tok, "small": small_ck, "small_yml": small_yml, "large": large_ck, "large_yml": large_yml,
            "small_hf": export(small_ck, small_yml, root / "small-hf"),
            "large_hf": export(large_ck, large_yml, root / "large-hf")}


def lm_eval_vs_ours(root: Path, limit: int = 5) -> dict:
    """lm_eval.simple_evaluate(model="hf", model_args="pretrained=EXPORT") on the export as written, and our lm-eval
    model on the NeoX checkpoint, over the local example tasks: {"hf": metrics, "ours": metrics}."""
    from neox_progressive.eval.harness import TaskSet, flat_metrics, import_lm_eval

    lm_eval = import_lm_eval()
    from neox_progressive.eval.lm import NeoXProgressiveLM
    from neox_progressive.eval.tasks import EXAMPLE_TASKS, write_example_tasks

    fam = spm_family(root)
    tasks = TaskSet([write_example_tasks(root / "tasks", n_docs=limit)])
    kw = dict(tasks=list(EXAMPLE_TASKS), limit=limit, bootstrap_iters=0, log_samples=False, batch_size=2)
    if tasks.manager is not None:
        kw["task_manager"] = tasks.manager
    hf = lm_eval.evaluator.simple_evaluate(model="hf", model_args=f"pretrained={fam['large_hf']},dtype=float32",
                                           device="cpu", **kw)
    ours = lm_eval.evaluator.simple_evaluate(
        model=NeoXProgressiveLM(checkpoint=str(fam["large"]), config=str(fam["large_yml"]), batch_size=2, device="cpu"),
        **{k: v for k, v in kw.items() if k != "batch_size"})
    return {"hf": flat_metrics(hf), "ours": flat_metrics(ours)}


@torch.no_grad()
def assisted_vs_greedy(root: Path, max_new_tokens: int = 24) -> dict:
    """transformers' assisted generation (the large export, the small one as assistant_model), prompts encoded by the
    export's own AutoTokenizer and no ids passed by hand; transformers' plain greedy; our reference model's greedy
    on the NeoX checkpoint (generation stops at the export's eos, as transformers')."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neox_progressive.io.reader import CheckpointReader
    from neox_progressive.model import Transformer

    fam = spm_family(root)
    tok = AutoTokenizer.from_pretrained(str(fam["large_hf"]))
    target = AutoModelForCausalLM.from_pretrained(str(fam["large_hf"]), torch_dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(str(fam["small_hf"]), torch_dtype=torch.float32).eval()
    reader = CheckpointReader(fam["large"], ModelShape.from_yamls([fam["large_yml"]]))
    ours = Transformer.from_state_dict(reader.shape, reader.state_dict()).eval()
    eos = json.loads((fam["large_hf"] / "generation_config.json").read_text())["eos_token_id"]
    out = {"eos": eos, "assisted": [], "greedy": [], "ours": [], "decoded": []}
    for prompt in ["Return a new  object,\nreplacing", "naïve\ttext"]:
        ids = tok(prompt, return_tensors="pt")
        n = ids.input_ids.shape[1]
        assisted = target.generate(**ids, assistant_model=draft, max_new_tokens=max_new_tokens, do_sample=False)
        greedy = target.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        seq = ids.input_ids[0].tolist()
        for _ in range(max_new_tokens):
            nxt = int(ours(torch.tensor([seq]))[0, -1].argmax())
            seq.append(nxt)
            if nxt == eos:
                break
        out["assisted"].append(assisted[0, n:].tolist())
        out["greedy"].append(greedy[0, n:].tolist())
        out["ours"].append(seq[n:])
        out["decoded"].append(tok.decode(assisted[0, n:]))
    return out
