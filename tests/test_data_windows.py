"""cut_windows: a member's window dataset holds exactly the tokens [start, end) of the source stream
(checked against a plain concatenation of the source's documents), window after window."""

import json

import numpy as np
import pytest

from neox_progressive.data import cut_windows, write_dataset
from neox_progressive.errors import UserError


@pytest.fixture
def src(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 500, size=n).tolist() for n in (7, 1, 30, 12, 5, 40, 3)]
    write_dataset(tmp_path / "src", docs, vocab_size=500)
    return tmp_path / "src", docs


@pytest.mark.parametrize("windows", [
    [[0, 98]],                     # everything
    [[3, 9]],                      # inside one document, then across a boundary
    [[7, 8]],                      # exactly one one-token document
    [[20, 60], [60, 70]],          # consecutive windows
    [[90, 98], [0, 12]],           # fixed data: a window that wraps to the start
])
def test_window_tokens_equal_stream_slices(src, tmp_path, windows):
    prefix, docs = src
    stream = np.concatenate([np.asarray(d) for d in docs])
    assert len(stream) == 98
    out = cut_windows(prefix, windows, tmp_path / "w")
    want = np.concatenate([stream[s:e] for s, e in windows])
    assert out.tokens().tolist() == want.tolist()
    assert out.dtype == np.uint16
    # every piece is its own document and no piece is empty
    assert out.doc_idx.tolist() == list(range(len(out) + 1))
    assert all(out.sizes > 0)


def test_boundaries_cut_documents(src, tmp_path):
    prefix, docs = src
    out = cut_windows(prefix, [[5, 40]], tmp_path / "w")
    # doc0 = tokens 0..6, doc1 = 7, doc2 = 8..37, doc3 = 38..49
    assert out.sizes.tolist() == [2, 1, 30, 2]
    assert out[0].tolist() == docs[0][5:] and out[3].tolist() == docs[3][:2]


def test_idempotent_and_force(src, tmp_path):
    prefix, _ = src
    cut_windows(prefix, [[0, 10]], tmp_path / "w")
    mtime = (tmp_path / "w.bin").stat().st_mtime_ns
    cut_windows(prefix, [[0, 10]], tmp_path / "w")            # same windows: nothing rewritten
    assert (tmp_path / "w.bin").stat().st_mtime_ns == mtime
    record = json.loads((tmp_path / "w.window.json").read_text())
    assert record["windows"] == [[0, 10]] and record["tokens"] == 10
    with pytest.raises(UserError, match="already exists"):
        cut_windows(prefix, [[0, 11]], tmp_path / "w")
    assert cut_windows(prefix, [[0, 11]], tmp_path / "w", force=True).num_tokens == 11


@pytest.mark.parametrize("windows,match", [
    ([[0, 99]], "past the end"),
    ([[5, 5]], "empty"),
    ([[-1, 4]], "negative"),
    ([], "no token window"),
    ([[1, 2, 3]], "pair"),
])
def test_bad_windows(src, tmp_path, windows, match):
    with pytest.raises(UserError, match=match):
        cut_windows(src[0], windows, tmp_path / "w")
