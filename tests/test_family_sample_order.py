"""+Fixed Data's epoch order without NeoX: the index maps written beside a window dataset (checked against a
brute-force walk over the tokens here; against NeoX's own code in test_family_neox_order.py), their
bookkeeping, and the builtin engine reading the same order."""

from __future__ import annotations

import numpy as np
import pytest

from neox_progressive.data import MMapDataset, cut_member_windows, write_dataset
from neox_progressive.data.sample_order import (
    neox_index_map_files,
    order_segments,
    read_order,
    remove_epoch_order,
    segment_samples,
    write_epoch_order,
)
from neox_progressive.train.batches import SampleSource

S = 16


@pytest.fixture(params=[1500, 1504], ids=["first-window-1500", "first-window-94xS"])
def windowed(tmp_path, request):
    """A source stream of documents (token value = position), and a member dataset of two windows that wraps (the
    first window's length a multiple of S or not)."""
    first = request.param
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 40, size=300)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    src = tmp_path / "src"
    write_dataset(src, (np.arange(a, b, dtype=np.int32) for a, b in zip(bounds, bounds[1:])), dtype=np.int32)
    total = int(bounds[-1])
    n = 250                                      # samples NeoX asks for
    length = n * S + 1                           # neox_window_tokens: n x S + 1
    start = total - first
    windows = [[start, total], [0, length - first]]
    row = {"name": "8B", "data_windows": windows, "train_data_path": str(tmp_path / "member"),
           "sample_order": {"order": "epochs", "num_samples": n, "seq_length": S, "seed": 7, "allow_chopped": True,
                            "segments": segment_samples([first, length - first], S, n)}}
    return src, row


def _walk(sizes: np.ndarray, n: int) -> list[list[int]]:
    """(document, offset) of token j*S for j = 0..n, by walking the documents one token at a time."""
    where, doc, off = [], 0, 0
    for pos in range(n * S + 1):
        if pos % S == 0:
            where.append([doc, off])
        off += 1
        while doc < len(sizes) and off == sizes[doc]:
            doc, off = doc + 1, 0
    return where


def test_index_maps_read_the_windows_one_after_the_other(windowed):
    src, row = windowed
    cut_member_windows(src, [row])
    prefix, order = row["train_data_path"], row["sample_order"]
    files = neox_index_map_files(prefix, 250, S, 7)
    assert files["shuffle"].name == f"member_train_0_indexmap_250ns_{S}sl_7s_packedpi_ac_shuffle_idx.npy"
    doc_idx, sample_idx, shuffle_idx = (np.load(files[k]) for k in ("doc", "sample", "shuffle"))
    ds = MMapDataset(prefix)
    assert doc_idx.tolist() == list(range(len(ds))) and doc_idx.dtype == np.int32
    assert sample_idx.tolist() == _walk(np.asarray(ds.sizes), 250)
    stream = ds.tokens()
    (a, end), (_, n) = order["segments"]
    assert sorted(shuffle_idx.tolist()) == list(range(n)) and sorted(shuffle_idx[:end].tolist()) == list(range(end))
    assert shuffle_idx[:end].tolist() != list(range(end))          # shuffled within the segment
    first_window = set(range(row["data_windows"][0][0], row["data_windows"][0][1]))
    for k, j in enumerate(shuffle_idx.tolist()):
        sample = stream[j * S: j * S + S + 1].tolist()
        assert set(sample) <= first_window if k < end else sample[-1] not in first_window
    assert read_order(prefix)["segments"] == order["segments"]


def test_rewritten_only_when_changed_and_removed_for_neox_order(windowed):
    src, row = windowed
    cut_member_windows(src, [row])
    files = neox_index_map_files(row["train_data_path"], 250, S, 7)
    stamp = {k: p.stat().st_mtime_ns for k, p in files.items()}
    cut_member_windows(src, [row])                                    # the same: nothing rewritten
    assert {k: p.stat().st_mtime_ns for k, p in files.items()} == stamp
    other = {**row, "sample_order": {**row["sample_order"], "seed": 8}}
    cut_member_windows(src, [other])                                  # another seed: other files, the old ones gone
    assert not any(p.exists() for p in files.values())
    assert all(p.exists() for p in neox_index_map_files(row["train_data_path"], 250, S, 8).values())
    cut_member_windows(src, [{**row, "sample_order": None}])         # fixed_data_order: shuffled
    assert read_order(row["train_data_path"]) is None
    assert not list(src.parent.glob("member_train_0_indexmap_*"))    # NeoX builds its own maps again
    assert not remove_epoch_order(row["train_data_path"])
    with pytest.raises(ValueError, match="holds 250 samples .* not the 251"):
        write_epoch_order(row["train_data_path"], [1500, 2501], S, 251, 7)


def test_builtin_engine_reads_the_same_order(windowed):
    src, row = windowed
    cut_member_windows(src, [row])
    (_, end), (_, n) = row["sample_order"]["segments"]
    source = SampleSource(MMapDataset(row["train_data_path"]), S, seed=3)
    assert source.segments == [[0, end], [end, n]]
    order = [source.sample_index(j) for j in range(n)]
    assert sorted(order[:end]) == list(range(end)) and sorted(order[end:]) == list(range(end, n))
    assert order_segments(row["train_data_path"], S + 1, n) is None   # another seq_length: not this order
    cut_member_windows(src, [{**row, "sample_order": None}])
    mixed = SampleSource(MMapDataset(row["train_data_path"]), S, seed=3)
    assert mixed.segments is None and any(mixed.sample_index(j) >= end for j in range(end))
