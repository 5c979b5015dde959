"""+Fixed Data's sample order, checked with GPT-NeoX's own dataset code (NEOX_DIR; megatron/data on CPU).

The training stream is made of tokens whose value is their position in the stream, so every sample NeoX
returns says where it came from. A tiny fixed-data family's last member has a window that wraps (the rest
of the stream, then its start again). Through NeoX's `build_weighted_datasets` + `BlendableDataset` (what
NeoX does for `train_data_paths`) we read the samples in the order NeoX trains on them:
- budget.fixed_data_order: epochs (the index maps the plugin writes): the first segment is the rest of the
  first epoch, the second epoch follows; every sample once, each exactly as NeoX's own sample_idx builds it;
- shuffled (NeoX builds its maps itself): first- and second-epoch samples interleave through the stage;
- two datasets in `train_data_paths` (the paper's order as "a second dataset after the first"): NeoX
  interleaves them by weight from the first batch on, so that is not a way to read them in order.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from family_util import tiny_family, write_family
from neox_run import neox_dir, neox_python, shim_dir

from neox_progressive.data import MMapDataset, cut_member_windows, write_dataset
from neox_progressive.data.sample_order import neox_index_map_files, neox_order_problem, read_order, remove_epoch_order
from neox_progressive.family import load_family, plan_family

pytestmark = pytest.mark.neox

# Runs inside NeoX's environment: the samples NeoX's data code yields for `train_data_paths`, in training order.
PROBE = r"""
import json, sys, tempfile, types
import numpy as np, torch
a = json.loads(sys.argv[1])
torch.distributed.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
from megatron import mpu
mpu.initialize_model_parallel(1)
from megatron.data import data_utils as du
from megatron.data import gpt2_dataset as g
from megatron.data.blendable_dataset import BlendableDataset
args = types.SimpleNamespace(train_data_paths=a["paths"], data_impl="mmap", pack_impl="packed", allow_chopped=True,
                             seq_length=a["seq"], seed=a["seed"], mmap_warmup=False, dataset_impl="gpt2",
                             precompute_model_name=None)
for key in ("train_label_data_paths", "train_reward_data_paths", "valid_data_paths", "valid_label_data_paths",
            "valid_reward_data_paths", "test_data_paths", "test_label_data_paths", "test_reward_data_paths",
            "pos_train_data_paths", "neg_train_data_paths", "pos_train_label_data_paths", "neg_train_label_data_paths",
            "pos_valid_data_paths", "neg_valid_data_paths", "pos_valid_label_data_paths", "neg_valid_label_data_paths",
            "pos_test_data_paths", "neg_test_data_paths", "pos_test_label_data_paths", "neg_test_label_data_paths"):
    setattr(args, key, None)
weights, nums = du.get_normalized_weights_and_num_samples(a["weights"], a["samples"])
train, _, _ = du.build_weighted_datasets(args, nums, [None], [None], None, None, None)
ds = BlendableDataset(train, weights)
out = {"samples": [ds[k]["text"].tolist() for k in range(a["samples"])], "num_samples": nums}
if a.get("sample_idx_of"):  # NeoX's own sample_idx (Python and C++) for documents in file order
    from megatron.data import helpers
    from megatron.data.indexed_dataset import MMapIndexedDataset
    indexed = MMapIndexedDataset(a["sample_idx_of"])
    sizes = np.array(indexed.sizes, dtype=np.int32)
    doc_idx = np.arange(len(sizes), dtype=np.int32)
    out["py"] = g._build_sample_idx(sizes, doc_idx, a["seq"], 1, int(sizes.sum())).tolist()
    out["cpp"] = np.asarray(helpers.build_sample_idx_int32(sizes, doc_idx, a["seq"], 1, int(sizes.sum()))).tolist()
print("PROBE-JSON " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def neox(tmp_path_factory) -> Path:
    """A copy of NEOX_DIR with its C++ dataset helpers built (NeoX builds them at start-up; NEOX_DIR stays as it is)."""
    root = tmp_path_factory.mktemp("neox") / "neox"
    shutil.copytree(neox_dir(), root, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.so"))
    py = Path(neox_python()).parent
    env = dict(os.environ, PATH=f"{py}{os.pathsep}{os.environ.get('PATH', '')}")
    subprocess.run(["make", "-C", str(root / "megatron" / "data")], check=True, capture_output=True, env=env)
    return root


def probe(neox: Path, **kw) -> dict:
    env = dict(os.environ, NEOX_CPU_SHIM="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(shim_dir()))
    proc = subprocess.run([neox_python(), "-c", PROBE, json.dumps(kw)], cwd=neox, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("PROBE-JSON "))
    return {**json.loads(line[len("PROBE-JSON "):]), "log": proc.stdout.replace(line, "")}


@pytest.fixture()
def family(tmp_path):
    """A tiny fixed-data family on a stream whose token values are their positions; its last member wraps."""
    data = tiny_family()
    data["budget"] = {"tokens_per_param": 2, "fixed_data": True}
    data["data"] = {"train": str(tmp_path / "stream"), "valid": str(tmp_path / "stream")}
    fam = load_family(write_family(tmp_path, data))
    plan = plan_family(fam)
    rng = np.random.default_rng(0)
    lengths, total = [], 0
    while total < plan.stream_tokens:  # documents of 1..200 tokens
        lengths.append(int(rng.integers(1, 200)))
        total += lengths[-1]
    bounds = np.cumsum([0] + lengths)
    write_dataset(fam.data.train, (np.arange(a, b, dtype=np.int32) for a, b in zip(bounds, bounds[1:])), dtype=np.int32)
    return fam, plan


def _origins(samples: list[list[int]], row) -> list[int]:
    """The window (0: the first epoch's rest, 1: the second epoch) each sample ends in."""
    (a0, b0), (a1, b1) = row.data_windows
    out = []
    for s in samples:
        assert a0 <= s[-1] < b0 or a1 <= s[-1] < b1, s[-3:]
        out.append(0 if a0 <= s[-1] < b0 else 1)
    return out


def test_neox_reads_the_fixed_data_epochs_in_the_papers_order(neox, family):
    fam, plan = family
    row = plan.rows[-1]
    assert len(row.data_windows) == 2 and row.sample_order["order"] == "epochs"
    cut_member_windows(fam.data.train, [r.__dict__ for r in plan.rows])
    files = neox_index_map_files(row.train_data_path, row.sample_order["num_samples"], 64, fam.training.seed)
    assert all(p.is_file() for p in files.values()) and read_order(row.train_data_path)["segments"] == row.sample_order[
        "segments"]
    trained = row.train_iters * row.global_batch  # what NeoX asks for: train_iters x train_batch_size
    res = probe(neox, paths=[row.train_data_path], weights=[1.0], samples=trained, seq=64, seed=fam.training.seed,
                sample_idx_of=row.train_data_path)
    assert res["num_samples"] == [row.sample_order["num_samples"]]  # the file names NeoX looked for are ours
    # what the runner checks in NeoX's log: NeoX loaded our maps (and under another name it would not have)
    assert neox_order_problem(res["log"], row.train_data_path, row.sample_order) is None
    other = {**row.sample_order, "seed": fam.training.seed + 1}
    assert "did not load" in neox_order_problem(res["log"], row.train_data_path, other)
    # our sample_idx is NeoX's own (its Python reference and the C++ helper it runs)
    ours = np.load(files["sample"]).tolist()
    assert ours == res["py"] == res["cpp"]
    # the paper's order: every first-epoch sample before any second-epoch one
    window = np.concatenate([np.arange(a, b) for a, b in row.data_windows])
    where = np.full(int(window.max()) + 1, -1)
    where[window] = np.arange(len(window))    # token value -> position in the window dataset (values are unique)
    first_end = row.sample_order["segments"][0][1]
    origins = _origins(res["samples"], row)
    assert origins == [0] * first_end + [1] * (trained - first_end)
    # each sample is S + 1 consecutive tokens of the window dataset, every sample at most once, shuffled within
    starts = []
    for s in res["samples"]:
        j = int(where[s[0]])
        assert s == window[j: j + 65].tolist()
        starts.append(j // 64)
    assert len(set(starts)) == trained and starts[:first_end] != sorted(starts[:first_end])
    assert sorted(starts[:first_end]) == list(range(first_end))


def test_without_the_order_neox_spreads_the_second_epoch_through_the_stage(neox, family):
    fam, plan = family
    rows = [r.__dict__ for r in plan.rows]
    rows[-1] = {**rows[-1], "sample_order": None}   # budget.fixed_data_order: shuffled
    cut_member_windows(fam.data.train, [r.__dict__ for r in plan.rows])
    cut_member_windows(fam.data.train, rows)         # removes the maps written before: NeoX builds its own
    row = plan.rows[-1]
    assert read_order(row.train_data_path) is None and not remove_epoch_order(row.train_data_path)
    trained = row.train_iters * row.global_batch
    res = probe(neox, paths=[row.train_data_path], weights=[1.0], samples=trained, seq=64, seed=fam.training.seed)
    origins = _origins(res["samples"], row)
    # had the epoch order been asked for, the runner would stop: NeoX built its own maps under the same names
    assert "built its own" in neox_order_problem(res["log"], row.train_data_path, row.sample_order)
    first_end = row.sample_order["segments"][0][1]
    second_share = sum(origins[:first_end]) / first_end
    print(f"shuffled: {second_share:.1%} of the first {first_end} samples are second-epoch samples")
    assert 0.3 < second_share < 0.7, second_share   # about the second epoch's share of the stage, not 0


def test_two_train_data_paths_are_interleaved_not_read_in_order(neox, family):
    """The other way one might try: the rest of the first epoch and the second epoch as two datasets."""
    fam, plan = family
    row = plan.rows[-1]
    first, second = (str(Path(fam.data.train).with_name(n)) for n in ("epoch1", "epoch2"))
    from neox_progressive.data import cut_windows

    n1 = (row.data_windows[0][1] - row.data_windows[0][0]) // 64
    cut_windows(fam.data.train, [row.data_windows[0]], first)
    cut_windows(fam.data.train, [row.data_windows[1]], second)
    res = probe(neox, paths=[first, second], weights=[n1, row.train_iters * row.global_batch - n1], samples=256, seq=64,
                seed=fam.training.seed)
    origins = _origins(res["samples"], row)
    print(f"two datasets: {sum(origins[:64])} of the first 64 samples come from the second")
    assert 0 < sum(origins[:64]) < 64   # both datasets within the first four batches
    assert len(MMapDataset(first)) > 0
