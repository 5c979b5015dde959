"""Helpers for the evaluation tests: a real BPE tokenizer trained on stdlib text, tiny members on disk, HF exports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from tiny import random_sd, tiny_shape, write_yaml

from neox_progressive.config import ModelShape
from neox_progressive.eval.member import TrainedMember
from neox_progressive.eval.tasks import stdlib_paragraphs
from neox_progressive.io.writer import write_checkpoint

EOT = "<|endoftext|>"


def require_lm_eval():
    """lm_eval, imported the plugin's way (offline-safe under lm_eval 0.4.1); skips only where lm-eval is not installed.

    Not `pytest.importorskip("lm_eval")`: a bare import fails offline under 0.4.1 and would skip (or break)
    what the plugin's own import path must handle."""
    import pytest  # not at the top: NeoX's virtualenv imports this module without pytest

    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("needs lm-eval (pip install -e '.[eval]')")
    from neox_progressive.eval.harness import import_lm_eval

    return import_lm_eval()


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


def token_id(tokenizer: Path, text: str) -> int:
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(tokenizer)).encode(text).ids
    assert len(ids) == 1, (text, ids)
    return ids[0]


def repeat_after_itself(sd: dict[str, torch.Tensor], token: int) -> None:
    """Make `token` the greedy next token wherever the current token is `token` (elsewhere the weights stay random):
    residual dimension 0 holds "the current token is `token`" (only its embedding writes there, no layer output
    does), and the head reads that dimension into `token`'s logit."""
    sd["embed.weight"][:, 0] = 0.0
    sd["embed.weight"][token, 0] = 1.0
    for key in sd:
        if key.endswith(("attn.o.weight", "mlp.down.weight")):
            sd[key][0] = 0.0
    sd["head.weight"][token, 0] = 4.0


def make_member(root: Path, name: str, tokenizer: Path, seed: int = 0, std: float = 0.15, family: str = "family",
                repeat_token: int | None = None, **shape_kw) -> TrainedMember:
    """A member with random weights: NeoX checkpoint + YAML naming the tokenizer (vocab padded to 64).
    With `repeat_token`, that token continues itself greedily (`repeat_after_itself`)."""
    root.mkdir(parents=True, exist_ok=True)
    shape = tiny_shape(**{"make_vocab_size_divisible_by": 64, **shape_kw})
    cfg = write_yaml(root / f"{name}.yml", shape, tokenizer_type="HFTokenizer", vocab_file=str(tokenizer))
    shape = ModelShape.from_yamls([cfg])
    sd = random_sd(shape, seed=seed, std=std)
    if repeat_token is not None:
        repeat_after_itself(sd, repeat_token)
    write_checkpoint(root / name, shape, sd)
    return TrainedMember(name=name, checkpoint=root / name, configs=[cfg], family=family)


def hf_export(member: TrainedMember, out: Path) -> Path:
    """LlamaForCausalLM dir + a fast tokenizer (eos = <|endoftext|>) that lm-eval's HFLM can load."""
    from transformers import PreTrainedTokenizerFast

    from neox_progressive.hf import export_hf

    eot = member.tokenizer.eod
    export_hf(member.reader, out, eos=eot, bos=eot)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(member.tokenizer.path), eos_token=EOT, bos_token=EOT)
    tok.save_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == member.shape.padded_vocab_size
    return out


def hf_model(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()


def compare_with_hflm(root: Path, limit: int = 6) -> dict:
    """Our lm-eval model and lm-eval's HFLM on the HF export of the same member: task metrics and raw requests.

    Runs under any lm-eval 0.4.x (the test of 0.4.1 calls it in NeoX's virtualenv)."""
    from neox_progressive.eval.harness import TaskSet, flat_metrics, import_lm_eval

    import_lm_eval()  # first: it serves lm_eval 0.4.1's Hub-loaded exact_match metric offline
    import lm_eval.models.huggingface as hf_models
    from lm_eval.api.instance import Instance

    from neox_progressive.eval.lm import NeoXProgressiveLM
    from neox_progressive.eval.tasks import EXAMPLE_TASKS, write_example_tasks

    root.mkdir(parents=True, exist_ok=True)
    tok_file = bpe_tokenizer(root / "tokenizer.json")
    the = token_id(tok_file, " the")
    member = make_member(root, "m", tok_file, num_kv_heads=2, std=0.08, repeat_token=the)
    hf_dir = hf_export(member, root / "hf")
    tasks = TaskSet([write_example_tasks(root / "tasks", n_docs=limit)])
    ours = NeoXProgressiveLM(checkpoint=str(member.checkpoint), config=str(member.configs[0]), batch_size=3, device="cpu")
    theirs = hf_models.HFLM(pretrained=str(hf_dir), batch_size=3, device="cpu", dtype="float32")
    out = {"tasks": {}, "requests": {}}
    for name, lm in (("ours", ours), ("hf", theirs)):
        out["tasks"][name] = flat_metrics(tasks.evaluate(lm, list(EXAMPLE_TASKS), limit=limit, bootstrap_iters=0))

    ctx = "Return a new object, replacing specified fields with new values. This is especially useful"
    pairs = [(ctx, " for frozen classes."), ("", "An empty context is scored after the end-of-text token."),
             ("Spaces at the end of a context   ", "move to the continuation."), (ctx * 3, " long contexts are cut")]
    pairs += [("If the", " the"), ("Return a new object", " the"), ("Return a new object", " the the"),
              ("If the", " the the")]   # greedy, not, not, greedy: after " the" comes " the" (repeat_token)
    texts = ["Short text.", ctx * 4]

    def req(kind, args):
        return Instance(request_type=kind, doc={}, arguments=args, idx=0)

    for name, lm in (("ours", NeoXProgressiveLM(model=ours.model, tokenizer=ours.tok, max_length=48, batch_size=2)),
                     ("hf", hf_models.HFLM(pretrained=str(hf_dir), batch_size=2, device="cpu", dtype="float32",
                                           max_length=48))):
        out["requests"][name] = {
            "loglikelihood": [list(x) for x in lm.loglikelihood([req("loglikelihood", p) for p in pairs])],
            "rolling": [float(x[0] if isinstance(x, tuple) else x)
                        for x in lm.loglikelihood_rolling([req("loglikelihood_rolling", (t,)) for t in texts])],
        }
    return out


def run_neox_with_plugin(neox_root: Path, script: str, config: Path, timeout: int = 900) -> str:
    """`deepy.py <script> <config>` in a NeoX tree on CPU, with this repository importable (for eval_hook)."""
    import os
    import subprocess

    from neox_run import neox_python, shim_dir

    py = neox_python()
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, NEOX_CPU_SHIM="1", DS_ACCELERATOR="cpu", WANDB_MODE="offline",
               PYTHONPATH=os.pathsep.join([str(shim_dir()), str(repo)]),
               TORCH_EXTENSIONS_DIR=str(Path(py).parent.parent / "ext"),
               PATH=f"{Path(py).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([py, "deepy.py", script, str(config)], cwd=neox_root, env=env, capture_output=True,
                          text=True, timeout=timeout)
    out = "\n".join(x for x in (proc.stdout + proc.stderr).splitlines() if "--megatron_config" not in x)
    if proc.returncode != 0:
        raise RuntimeError(f"NeoX {script} failed ({proc.returncode}):\n" + "\n".join(out.splitlines()[-60:]))
    return out


def neox_preprocess(neox_root: Path, jsonl: Path, tokenizer: Path, prefix: Path) -> Path:
    """NeoX's own tools/datasets/preprocess_data.py (HFTokenizer, --append-eod) -> <prefix>_text_document."""
    import subprocess

    from neox_run import neox_python

    proc = subprocess.run([neox_python(), "tools/datasets/preprocess_data.py", "--input", str(jsonl), "--output-prefix",
                           str(prefix), "--tokenizer-type", "HFTokenizer", "--vocab-file", str(tokenizer), "--append-eod",
                           "--workers", "1"], cwd=neox_root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return Path(f"{prefix}_text_document")


def bpe_tokenizer_for_neox(path: Path, vocab_size: int = 300) -> Path:
    """`bpe_tokenizer`, written by NeoX's python: newer `tokenizers` write JSON that NeoX's pinned one cannot read."""
    import os
    import subprocess

    from neox_run import neox_python

    tests = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))
    code = f"import pathlib, eval_util; eval_util.bpe_tokenizer(pathlib.Path({str(path)!r}), {vocab_size})"
    proc = subprocess.run([neox_python(), "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return path
