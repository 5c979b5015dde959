"""Plugin side of NeoX patch 0003 (`eval_hook`): the KL between the member in training and the previous one.

At every evaluation (each `eval_interval`, and the final validation/test evaluations) patched
NeoX calls `kl_to_previous(neox_args=..., model=..., forward_step_fn=..., **eval_hook_args)`.
It scores the same held-out windows with the model being trained (NeoX's own model and batch
code, so any TP/PP layout) and with the previous, smaller family member (loaded once through the plugin's
reader and reference model, on the same device), and returns

    {"kl_previous_member": mean over windows of mean over positions of KL(p_previous || p_current)}

(paper App. F, the smaller member first), which NeoX logs as `validation/kl_previous_member`
(wandb, tensorboard, the log). The value is also appended to `log_file` (JSON lines) if given.

Member YAML (patched NeoX only: unpatched NeoX rejects these keys):

    eval_hook: "neox_progressive.eval.neox_hook:kl_to_previous"
    eval_hook_args:
      previous_checkpoint: runs/fam/progressive/1B/checkpoints
      previous_config: [runs/fam/configs/1B.yml]
      data_path: data/valid_text_document   # default: valid_data_paths[0], else data_path
      num_sequences: 8                      # windows scored per evaluation
      seq_length: 512                       # default: the run's seq_length
      log_file: runs/fam/progressive/2B/kl_previous.jsonl
      dtype: bf16                           # of the previous member's weights (default fp32)

neox_progressive must be importable by NeoX's python (pip install -e, or on PYTHONPATH). A bad
argument (missing checkpoint, other tokenizer, no data) stops the run at its first evaluation. The
windows are read with NeoX's own mmap reader (megatron.data.indexed_dataset). Every rank loads
the previous member (it is the smaller model); ranks without logits (pipeline stages before the
last) return nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from neox_progressive.errors import UserError
from neox_progressive.eval.kl import kl_from_logits
from neox_progressive.eval.member import TrainedMember
from neox_progressive.eval.perplexity import token_windows

_CACHE: dict[tuple, tuple] = {}


def _documents(path: str):
    from megatron.data.indexed_dataset import make_dataset  # NeoX's reader: we run inside NeoX

    ds = make_dataset(path, "mmap", skip_warmup=True)
    if ds is None:
        raise UserError(f"eval_hook_args.data_path {path!r}: no NeoX dataset there (expected {path}.bin and {path}.idx)")
    for i in range(len(ds)):
        yield np.asarray(ds[i])


def _setup(neox_args, device, previous_checkpoint, previous_config, data_path, num_sequences, seq_length, dtype):
    configs = [previous_config] if isinstance(previous_config, str) else list(previous_config)
    prev = TrainedMember("previous", Path(previous_checkpoint), [Path(c) for c in configs])
    if prev.has_tokenizer() and prev.tokenizer.vocab_size != neox_args.tokenizer.vocab_size:
        raise UserError(f"eval_hook: the previous member's tokenizer has {prev.tokenizer.vocab_size} tokens, this run's "
                        f"{neox_args.tokenizer.vocab_size}; KL needs one tokenizer for both")
    path = data_path or (neox_args.valid_data_paths or [None])[0] or neox_args.data_path
    if not path:
        raise UserError("eval_hook_args.data_path is not set and the run has no valid_data_paths / data_path")
    seq = int(seq_length or neox_args.seq_length)
    windows = list(token_windows(_documents(path), seq + 1, int(num_sequences)))
    if not windows:
        raise UserError(f"eval_hook: {path} is shorter than one window of {seq + 1} tokens")
    return prev.load(device, dtype), torch.as_tensor(np.stack(windows))


def _current_logits(neox_args, model, tokens: torch.Tensor):
    """Logits [B, T, V] of the model being trained on tokens [B, T + 1] (inputs = all but the last), or None.

    Not through `forward_step(return_logits=True)`: NeoX's cross entropy works in place on fp32 logits
    (mpu/cross_entropy.py subtracts the max and exponentiates `output.float()`, the same tensor in fp32), so
    the "logits" it returns are softmax probabilities in fp32 runs.
    """
    data = iter([{"text": tokens}])
    if neox_args.is_pipe_parallel:  # as NeoX's eval adapter drives a PipelineEngine, but without the loss
        saved = model.micro_batches
        model.micro_batches = 1
        model.first_output_send = True
        model.pipe_recv_buf = None
        try:
            _, logits = model.eval_batch(data, return_logits=True, compute_loss=False)
        finally:
            model.micro_batches = saved
    else:
        from megatron.training import get_batch

        tokens_in, _, _, attention_mask, position_ids = get_batch(neox_args=neox_args, data_iterator=data)
        logits = model((tokens_in, position_ids, attention_mask), neox_args=neox_args)
    if logits is None:
        return None
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if logits.shape[-1] != neox_args.padded_vocab_size:  # vocab-parallel output: gather it
        from megatron import mpu

        logits = mpu.gather_from_model_parallel_region(logits)
    return logits


@torch.no_grad()
def kl_to_previous(neox_args, model, forward_step_fn, *, previous_checkpoint: str, previous_config: str | list[str],
                   data_path: str | None = None, num_sequences: int = 8, seq_length: int | None = None,
                   batch_size: int = 1, log_file: str | None = None, name: str = "kl_previous_member",
                   dtype: str = "fp32") -> dict:
    """NeoX `eval_hook`: {name: App. F KL(p_previous || p_current)} over `num_sequences` held-out windows.

    `forward_step_fn` is part of the hook interface; it is not used (see `_current_logits`).
    """
    device = next(model.parameters()).device
    key = (str(previous_checkpoint), str(previous_config), data_path, num_sequences, seq_length, str(device), dtype)
    if key not in _CACHE:
        _CACHE[key] = _setup(neox_args, device, previous_checkpoint, previous_config, data_path, num_sequences, seq_length,
                             dtype)
    previous, windows = _CACHE[key]
    vocab = neox_args.tokenizer.vocab_size
    start = time.perf_counter()
    per_example: list[float] = []
    for s in range(0, len(windows), batch_size):
        batch = windows[s:s + batch_size]
        current = _current_logits(neox_args, model, batch)
        if current is None:
            return {}
        small = previous(batch[:, :-1].to(device))
        kl = kl_from_logits(small[..., :vocab], current[..., :vocab].to(small.device))  # (B, T)
        per_example += kl.double().mean(-1).tolist()
    value = sum(per_example) / len(per_example)
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if log_file and rank0:
        with open(log_file, "a") as f:
            f.write(json.dumps({"iteration": neox_args.iteration, name: value, "sequences": len(per_example),
                                "seconds": time.perf_counter() - start}) + "\n")
    return {name: value}


def hook_config(previous_checkpoint: str | Path, previous_config: list[str | Path], *, data_path: str | None = None,
                num_sequences: int = 8, log_file: str | Path | None = None, dtype: str = "fp32") -> dict:
    """The NeoX config keys that turn the hook on for a member trained after `previous_checkpoint`.

    For config generators: merge the result into the member's stage YAML (patched NeoX only; check
    with `neox-progressive neox-patch --neox-dir DIR --check`).
    """
    args: dict = {"previous_checkpoint": str(previous_checkpoint), "previous_config": [str(c) for c in previous_config],
                  "num_sequences": int(num_sequences), "dtype": dtype}
    if data_path:
        args["data_path"] = str(data_path)
    if log_file:
        args["log_file"] = str(log_file)
    return {"eval_hook": "neox_progressive.eval.neox_hook:kl_to_previous", "eval_hook_args": args}
