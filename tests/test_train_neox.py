"""The builtin engine and real GPT-NeoX (NEOX_DIR) load each other's checkpoints.

1. NeoX trains a tiny model from scratch (sequential format, pp=0), saves it, and evaluates it; the
   reference model on that checkpoint, read by our reader, scores NeoX's first validation batch
   exactly as NeoX did. The builtin engine then finetunes from it and starts at that checkpoint's loss.
2. The builtin engine trains and saves (pipeline format); NeoX finetunes from that checkpoint
   (`finetune: true`), and its first logged training loss equals the reference model's loss on
   NeoX's first training batch.

NeoX's batches are rebuilt from the index maps it saves next to the data (doc_idx, sample_idx,
shuffle_idx of megatron/data/gpt2_dataset.py): sample i is the token range from position
sample_idx[i] to position sample_idx[i + 1] (inclusive) of the items concatenated in doc_idx order.
"""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from neox_run import CPU_KEYS, run_neox
from train_util import make_data, stage_config, tiny_shape, write_stage

from neox_progressive.data import MMapDataset
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.model import Transformer
from neox_progressive.train import expanded_loss, parse_neox_losses, read_metrics, train_stage

pytestmark = pytest.mark.neox
B = 2


def neox_batch(prefix: str, name: str, first: int, size: int) -> torch.Tensor:
    """Samples first..first+size-1 of a NeoX GPT2Dataset, from the index maps NeoX saved."""
    from pathlib import Path

    stem = Path(prefix)
    found = sorted(stem.parent.glob(f"{stem.name}_{name}_indexmap_*_doc_idx.npy"))
    assert len(found) == 1, found
    base = str(found[0])[: -len("doc_idx.npy")]
    doc_idx, sample_idx, shuffle_idx = (np.load(base + f"{k}.npy") for k in ("doc_idx", "sample_idx", "shuffle_idx"))
    ds = MMapDataset(prefix)
    stream = np.concatenate([ds[int(d)] for d in doc_idx])
    starts = np.concatenate([[0], np.cumsum([ds.sizes[int(d)] for d in doc_idx])])
    rows = []
    for j in range(first, first + size):
        i = int(shuffle_idx[j])
        a = starts[sample_idx[i][0]] + sample_idx[i][1]
        b = starts[sample_idx[i + 1][0]] + sample_idx[i + 1][1]
        rows.append(stream[a: b + 1])
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def reference_loss(ckpt, shape, batch) -> float:
    reader = CheckpointReader(ckpt, shape)
    model = Transformer.from_state_dict(reader.shape, {k: v.float() for k, v in reader.state_dict().items()})
    with torch.no_grad():
        logits = model(batch[:, :-1])
    return float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))


def neox_config(data, shape, **over) -> dict:
    cfg = shape.to_neox() | CPU_KEYS | {
        "tokenizer_type": "SPMTokenizer", "vocab_file": data["tokenizer"], "data_impl": "mmap",
        "optimizer": {"type": "lion", "params": {"lr": 1e-3, "betas": [0.9, 0.99]}}, "min_lr": 1e-4,
        "lr_decay_style": "cosine", "warmup": 0.1, "train_micro_batch_size_per_gpu": B, "gradient_accumulation_steps": 1,
        "log_interval": 1, "seed": 5, "checkpoint_activations": False, "partition_activations": False,
    }
    return cfg | over


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("nxdata"), n_chars=60_000)


def test_neox_checkpoint_loads_in_builtin_engine(data, tmp_path):
    shape = tiny_shape(pp=0)
    cfg = neox_config(data, shape, train_data_paths=[data["train"]], valid_data_paths=[data["valid"]],
                      test_data_paths=[data["valid"]], train_iters=3, save=str(tmp_path / "nx"), checkpoint_factor=3,
                      eval_interval=3, eval_iters=1)
    (tmp_path / "nx.yml").write_text(yaml.safe_dump(cfg))
    log = run_neox("train.py", tmp_path / "nx.yml", log=tmp_path / "neox.log")
    neox_eval = float(re.search(r"results at iteration 3 \| lm_loss value: ([0-9.E+-]+)", log).group(1))
    batch = neox_batch(data["valid"], "valid_0", 0, B)
    ours = reference_loss(tmp_path / "nx", shape, batch)
    assert ours == pytest.approx(neox_eval, abs=2e-5)

    stage = stage_config(data, tmp_path / "ck", shape, load=str(tmp_path / "nx"), finetune=True, train_iters=2)
    res = train_stage(write_stage(tmp_path / "s.yml", stage), device="cpu", quiet=True)
    assert res.start_valid_loss == pytest.approx(expanded_loss(tmp_path / "nx", tmp_path / "s.yml", n_batches=2,
                                                               device="cpu"), abs=1e-6)
    assert read_metrics(res.metrics_path, "train")[0]["iteration"] == 1


def test_builtin_checkpoint_loads_in_neox(data, tmp_path):
    shape = tiny_shape(pp=1)
    stage = stage_config(data, tmp_path / "ck", shape, train_iters=60, checkpoint_factor=60)
    res = train_stage(write_stage(tmp_path / "s.yml", stage), device="cpu", quiet=True)
    cfg = neox_config(data, shape, data_path=data["train"], split="1000,0,0", train_iters=1, load=str(res.save_dir),
                      finetune=True, eval_interval=1000)
    (tmp_path / "nx.yml").write_text(yaml.safe_dump(cfg))
    log = run_neox("train.py", tmp_path / "nx.yml", log=tmp_path / "neox.log")
    assert "Unable to load checkpoint" not in log
    neox_first = float(re.search(r"iteration\s+1/\s*1 \|.*?lm_loss: ([0-9.E+-]+)", log).group(1))
    assert parse_neox_losses(log) == [(1, neox_first)]
    ours = reference_loss(res.save_dir, shape, neox_batch(data["train"], "train", 0, B))
    assert ours == pytest.approx(neox_first, abs=2e-5)
    assert neox_first < np.log(512) - 0.5                    # trained weights, not a random init
