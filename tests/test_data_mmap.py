"""NeoX's mmap indexed dataset: our writer and reader against an independent byte-level construction
(the layout written out from megatron/data/indexed_dataset.py in this test), and bad files."""

import struct

import numpy as np
import pytest

from neox_progressive.data import DatasetBuilder, MMapDataset, best_fitting_dtype, write_dataset
from neox_progressive.errors import UserError

DOCS = [[5, 6, 7], [1], [9, 9, 9, 9, 2], [], [300, 4]]


def handmade_idx(sizes, doc_idx, code, itemsize, pointers=None):
    """The .idx bytes, field by field: magic, version u64, dtype u8, len u64, doc count u64,
    sizes i32[], pointers i64[], doc_idx i64[] (little endian)."""
    if pointers is None:
        pointers, acc = [], 0
        for s in sizes:
            pointers.append(acc)
            acc += s * itemsize
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    out += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(doc_idx))
    out += b"".join(struct.pack("<i", s) for s in sizes)
    out += b"".join(struct.pack("<q", p) for p in pointers)
    out += b"".join(struct.pack("<q", d) for d in doc_idx)
    return out


@pytest.mark.parametrize("vocab,code,fmt", [(1000, 8, "<H"), (70000, 4, "<i")])
def test_writer_bytes_equal_handmade(tmp_path, vocab, code, fmt):
    write_dataset(tmp_path / "d", DOCS, vocab_size=vocab)
    itemsize = struct.calcsize(fmt)
    want_bin = b"".join(struct.pack(fmt, t) for doc in DOCS for t in doc)
    want_idx = handmade_idx([len(d) for d in DOCS], list(range(len(DOCS) + 1)), code, itemsize)
    assert (tmp_path / "d.bin").read_bytes() == want_bin
    assert (tmp_path / "d.idx").read_bytes() == want_idx


def test_reader_reads_handmade(tmp_path):
    (tmp_path / "h.bin").write_bytes(b"".join(struct.pack("<i", t) for doc in DOCS for t in doc))
    (tmp_path / "h.idx").write_bytes(handmade_idx([len(d) for d in DOCS], [0, 2, 5], 4, 4))
    ds = MMapDataset(tmp_path / "h")
    assert ds.dtype == np.int32 and len(ds) == len(DOCS) and ds.contiguous
    assert [ds[i].tolist() for i in range(len(ds))] == DOCS
    assert ds.doc_idx.tolist() == [0, 2, 5]
    assert ds.tokens().tolist() == [t for d in DOCS for t in d]
    assert ds.tokens(2, 4).tolist() == [9, 9, 9, 9, 2]
    assert [d.tolist() for d in ds.documents()] == [[5, 6, 7, 1], [9, 9, 9, 9, 2, 300, 4]]
    assert ds.num_tokens == 11


def test_reader_follows_pointers_with_gaps(tmp_path):
    # items stored out of order with padding between them: the pointers, not the sizes, decide
    data = [0, 0, 7, 8, 0, 1, 2, 3]
    (tmp_path / "g.bin").write_bytes(b"".join(struct.pack("<H", t) for t in data))
    (tmp_path / "g.idx").write_bytes(handmade_idx([3, 2], [0, 1, 2], 8, 2, pointers=[10, 4]))
    ds = MMapDataset(tmp_path / "g")
    assert not ds.contiguous
    assert ds[0].tolist() == [1, 2, 3] and ds[1].tolist() == [7, 8]
    assert ds.tokens().tolist() == [1, 2, 3, 7, 8]


def test_best_fitting_dtype_is_neox_rule():
    assert best_fitting_dtype(65499) == np.uint16
    assert best_fitting_dtype(65500) == np.int32
    assert best_fitting_dtype(None) == np.int32


@pytest.mark.parametrize("damage,match", [
    (lambda p: p.with_suffix(".idx").write_bytes(b"NOTMAGIC" + bytes(40)), "not a NeoX mmap index"),
    (lambda p: p.with_suffix(".idx").write_bytes(p.with_suffix(".idx").read_bytes()[:-3]), "truncated"),
    (lambda p: p.with_suffix(".bin").write_bytes(p.with_suffix(".bin").read_bytes()[:4]), "do not belong together"),
    (lambda p: p.with_suffix(".bin").unlink(), "does not exist"),
])
def test_bad_files_are_refused(tmp_path, damage, match):
    write_dataset(tmp_path / "d", DOCS, vocab_size=1000)
    damage(tmp_path / "d.bin")
    with pytest.raises(UserError, match=match):
        MMapDataset(tmp_path / "d")


def test_neox_name_hint(tmp_path):
    write_dataset(tmp_path / "c_text_document", DOCS, vocab_size=1000)
    with pytest.raises(UserError, match="did you mean .*c_text_document"):
        MMapDataset(tmp_path / "c")


def test_builder_is_atomic_and_refuses_existing(tmp_path):
    with pytest.raises(RuntimeError), DatasetBuilder(tmp_path / "x", np.uint16) as b:
        b.add_document([1, 2])
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    write_dataset(tmp_path / "x", DOCS, vocab_size=10)
    with pytest.raises(UserError, match="already exists"):
        write_dataset(tmp_path / "x", DOCS, vocab_size=10)
    write_dataset(tmp_path / "x", [[1]], vocab_size=10, force=True)
    assert MMapDataset(tmp_path / "x").tokens().tolist() == [1]
    with pytest.raises(UserError, match="does not fit"):
        write_dataset(tmp_path / "y", [[70000]], dtype=np.uint16)
