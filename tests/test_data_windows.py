"""cut_windows: a member's window dataset holds exactly the tokens [start, end) of the source stream
(checked against a plain concatenation of the source's documents), window after window."""

import json

import numpy as np
import pytest

from neox_progressive.data import cut_member_windows, cut_windows, neox_window_tokens, write_dataset
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


def test_cut_member_windows_from_plan(src, tmp_path):
    prefix, docs = src
    stream = np.concatenate([np.asarray(d) for d in docs])
    members = [{"name": "m1", "data_windows": [[0, 40]], "train_data_path": str(tmp_path / "train.m1")},
               {"name": "m2", "data_windows": [[40, 98], [0, 10]], "train_data_path": str(tmp_path / "train.m2")}]
    out = cut_member_windows(prefix, members)
    assert out["m1"].tokens().tolist() == stream[:40].tolist()
    assert out["m2"].tokens().tolist() == stream[40:].tolist() + stream[:10].tolist()
    with pytest.raises(UserError, match="regenerate the plan"):
        cut_member_windows(prefix, [{"name": "m3"}])


def test_neox_window_tokens_by_hand():
    # 100 iterations x 8 samples: NeoX asks for ceil(800 * 1.005) = 804 samples of 64 tokens (+1 to close the last)
    assert neox_window_tokens(100, 8, 64) == 804 * 64 + 1
    assert neox_window_tokens(100, 8, 64, weighted=False) == 800 * 64 + 1


@pytest.mark.neox
def test_neox_window_tokens_is_one_neox_epoch():
    import json
    import math
    import subprocess

    from neox_run import neox_dir, neox_python

    cases = [(100, 8, 64), (37, 3, 128), (1, 1, 2048), (5000, 512, 2048)]
    rows = [[neox_window_tokens(*c), c[2], math.ceil(c[0] * c[1] * 1.005)] for c in cases]
    rows += [[t - 1, s, n] for t, s, n in rows]
    script = ("import sys, json; sys.path.insert(0, '.')\n"
              "from megatron.data.gpt2_dataset import _num_epochs\n"
              "print('JSON' + json.dumps([_num_epochs(t, s, n) for t, s, n in json.loads(sys.argv[1])]))\n")
    proc = subprocess.run([neox_python(), "-c", script, json.dumps(rows)], cwd=neox_dir(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    epochs = json.loads(proc.stdout.split("JSON", 1)[1])
    assert epochs == [1] * len(cases) + [2] * len(cases)     # one token less and NeoX needs a second epoch


def test_a_copied_data_dir_is_the_same_data(src, tmp_path):
    """A family's data dir copied elsewhere (source and cut windows): the windows are recognized, not refused with
    advice (`--force`) that `run` cannot take."""
    import shutil

    prefix, _ = src
    cut_windows(prefix, [[3, 40]], tmp_path / "src.m")
    shutil.copytree(tmp_path, tmp_path.parent / "copy")
    copy = tmp_path.parent / "copy"
    before = (copy / "src.m.bin").stat().st_mtime_ns
    out = cut_windows(copy / "src", [[3, 40]], copy / "src.m")
    assert (copy / "src.m.bin").stat().st_mtime_ns == before and len(out.tokens()) == 37
    assert json.loads((copy / "src.m.window.json").read_text())["source"] == str((copy / "src").resolve())
    with pytest.raises(UserError) as info:  # other windows: refused, with a command that exists
        cut_windows(copy / "src", [[0, 20]], copy / "src.m")
    assert "prepare-data --family FAMILY.yml --force" in str(info.value) and "force=True (--force)" not in str(info.value)
