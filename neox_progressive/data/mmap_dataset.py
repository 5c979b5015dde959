"""GPT-NeoX's memory-mapped indexed dataset (`<prefix>.bin` + `<prefix>.idx`), read and written.

The format, as NeoX's `megatron/data/indexed_dataset.py` (MMapIndexedDataset, its Index and
MMapIndexedDatasetBuilder) reads and writes it, and `tools/datasets/preprocess_data.py` produces it:

    <prefix>.bin   the tokens of every item back to back, in the dataset's dtype
    <prefix>.idx   little endian:
        9 bytes   magic b"MMIDIDX\\x00\\x00"
        u64       version, always 1
        u8        dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float32, 7 float64, 8 uint16
        u64       n  = number of items ("sizes")
        u64       m  = number of entries of doc_idx
        i32[n]    sizes: tokens per item
        i64[n]    pointers: byte offset of each item in .bin (cumulative sizes x itemsize)
        i64[m]    doc_idx: item index where each document starts, [0, ..., n]

`preprocess_data.py` writes one item per document (its tokens, plus EOD with `--append-eod`)
and then `end_document()`, so doc_idx = [0, 1, ..., n]. The dtype is uint16 when the tokenizer's
vocab size is below 65500, else int32 (`indexed_dataset.__best_fitting_dtype`).

NeoX's training data loader (`data_utils.build_train_valid_test_datasets`, `gpt2_dataset.py`)
treats the *items* as its documents, in file order: the token stream of a dataset is the
concatenation of its items. `MMapDataset.tokens()` gives that stream.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from neox_progressive.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPES: dict[int, type] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float32, 7: np.float64, 8: np.uint16,
}
HEADER_BYTES = len(MAGIC) + 8 + 1 + 8 + 8


def dtype_code(dtype) -> int:
    dtype = np.dtype(dtype)
    for code, t in DTYPES.items():
        if np.dtype(t) == dtype:
            return code
    raise ValueError(f"dtype {dtype} has no code in NeoX's indexed dataset format")


def best_fitting_dtype(vocab_size: int | None) -> type:
    """NeoX's choice: uint16 below 65500 tokens, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def paths_of(prefix: str | Path) -> tuple[Path, Path]:
    """(<prefix>.bin, <prefix>.idx); the prefix is used as given (NeoX appends the suffixes)."""
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def dataset_exists(prefix: str | Path) -> bool:
    return all(p.is_file() for p in paths_of(prefix))


class MMapDataset:
    """Read-only view of a NeoX mmap dataset.

    Args:
        prefix: the path without `.bin`/`.idx` (what NeoX's `data_path` names).

    Attributes: `dtype`, `sizes` (int32 per item), `pointers` (int64 byte offsets), `doc_idx`.
    `ds[i]` is item i (a NumPy view); `tokens()` the whole token stream.
    """

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        self.bin_path, self.idx_path = paths_of(prefix)
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                hint = ""
                if Path(self.prefix + "_text_document.idx").is_file():
                    hint = f"; did you mean {self.prefix}_text_document (the name NeoX's preprocess_data.py writes)?"
                raise UserError(f"dataset file {p} does not exist (prefix {self.prefix!r}){hint}")
        self._read_index()
        self._check_bin()

    def _read_index(self) -> None:
        path = self.idx_path
        with path.open("rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[: len(MAGIC)] != MAGIC:
            raise UserError(
                f"{path} is not a NeoX mmap index (magic {head[:9]!r}, expected {MAGIC!r}); "
                "write it with `neox-progressive prepare-data` or NeoX's preprocess_data.py --dataset-impl mmap"
            )
        version, code, n, m = struct.unpack("<QBQQ", head[len(MAGIC):])
        if version != VERSION:
            raise UserError(f"{path}: index version {version}, expected {VERSION}")
        if code not in DTYPES:
            raise UserError(f"{path}: unknown dtype code {code} (known: {sorted(DTYPES)})")
        self.dtype = np.dtype(DTYPES[code])
        want = HEADER_BYTES + 4 * n + 8 * n + 8 * m
        have = path.stat().st_size
        if have != want:
            raise UserError(f"{path} has {have} bytes but its header implies {want} ({n} items, {m} doc_idx entries); "
                            "the file is truncated or damaged: prepare the data again")
        self._idx = np.memmap(path, mode="r", dtype=np.uint8)
        self.sizes = np.frombuffer(self._idx, dtype=np.int32, count=n, offset=HEADER_BYTES)
        self.pointers = np.frombuffer(self._idx, dtype=np.int64, count=n, offset=HEADER_BYTES + 4 * n)
        self.doc_idx = np.frombuffer(self._idx, dtype=np.int64, count=m, offset=HEADER_BYTES + 12 * n)

    def _check_bin(self) -> None:
        size = self.bin_path.stat().st_size
        n = len(self.sizes)
        end = int(self.pointers[-1]) + int(self.sizes[-1]) * self.dtype.itemsize if n else 0
        if size < end or size % self.dtype.itemsize:
            raise UserError(f"{self.bin_path} has {size} bytes but {self.idx_path} points up to byte {end}; "
                            "the .bin and .idx do not belong together or the .bin is truncated")
        self._bin = np.memmap(self.bin_path, mode="r", dtype=self.dtype) if size else np.zeros(0, self.dtype)
        expected = np.zeros(n, dtype=np.int64)
        if n:
            np.cumsum(self.sizes[:-1], dtype=np.int64, out=expected[1:])
        self.contiguous = bool(np.array_equal(expected * self.dtype.itemsize, self.pointers))

    # ---- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self._bin[start: start + int(self.sizes[i])]

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def tokens(self, first_item: int = 0, end_item: int | None = None) -> np.ndarray:
        """The token stream of items [first_item, end_item) (a memory-mapped view when the items
        are stored back to back, as every builder writes them; a copy otherwise)."""
        end_item = len(self) if end_item is None else end_item
        if first_item >= end_item:
            return np.zeros(0, dtype=self.dtype)
        if self.contiguous:
            start = int(self.pointers[first_item]) // self.dtype.itemsize
            stop = int(self.pointers[end_item - 1]) // self.dtype.itemsize + int(self.sizes[end_item - 1])
            return self._bin[start:stop]
        return np.concatenate([self[i] for i in range(first_item, end_item)])

    def documents(self) -> list[np.ndarray]:
        """The items grouped by doc_idx, each document's items concatenated."""
        bounds = [int(x) for x in self.doc_idx]
        return [self.tokens(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


class DatasetBuilder:
    """Write a NeoX mmap dataset item by item; atomic (temporary files renamed at the end).

    Use as a context manager: `add_document(tokens)` writes one item and ends a document
    (what preprocess_data.py does per input document). On an exception nothing is left behind.
    """

    def __init__(self, prefix: str | Path, dtype=np.uint16, *, force: bool = False):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        self.bin_path, self.idx_path = paths_of(prefix)
        if not force and (self.bin_path.exists() or self.idx_path.exists()):
            raise UserError(f"dataset {self.prefix}.bin/.idx already exists; choose another output or pass --force")
        self.sizes: list[int] = []
        self.doc_idx: list[int] = [0]
        self._tmp_bin = self.bin_path.with_name(f".{self.bin_path.name}.tmp-{os.getpid()}")
        self._tmp_idx = self.idx_path.with_name(f".{self.idx_path.name}.tmp-{os.getpid()}")
        self._file = None

    def __enter__(self) -> DatasetBuilder:
        self.bin_path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self._tmp_bin.open("wb")
        return self

    def add_item(self, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"an item must be a 1-D token array, got shape {arr.shape}")
        if arr.size and (arr.min() < np.iinfo(self.dtype).min or arr.max() > np.iinfo(self.dtype).max):
            raise UserError(f"token id {int(arr.max())} does not fit the dataset dtype {self.dtype}; use int32")
        self._file.write(arr.astype(self.dtype, copy=False).tobytes(order="C"))
        self.sizes.append(int(arr.size))

    def end_document(self) -> None:
        self.doc_idx.append(len(self.sizes))

    def add_document(self, tokens) -> None:
        self.add_item(tokens)
        self.end_document()

    @property
    def num_tokens(self) -> int:
        return sum(self.sizes)

    def __exit__(self, exc_type, exc, tb):
        self._file.close()
        if exc_type is not None:
            for p in (self._tmp_bin, self._tmp_idx):
                p.unlink(missing_ok=True)
            return False
        try:
            write_index(self._tmp_idx, self.dtype, self.sizes, self.doc_idx)
            for p in (self._tmp_bin, self._tmp_idx):
                _fsync(p)
            # the old index goes first, the new one comes last: no moment shows a mismatched pair
            self.idx_path.unlink(missing_ok=True)
            os.replace(self._tmp_bin, self.bin_path)
            os.replace(self._tmp_idx, self.idx_path)
        finally:
            for p in (self._tmp_bin, self._tmp_idx):
                p.unlink(missing_ok=True)
        return False


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_index(path: str | Path, dtype, sizes, doc_idx) -> None:
    """Write a `.idx` file for items of `sizes` tokens stored back to back."""
    dtype = np.dtype(dtype)
    sizes = np.asarray(sizes, dtype=np.int64)
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes):
        np.cumsum(sizes[:-1], out=pointers[1:])
    pointers *= dtype.itemsize
    with open(path, "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<QB", VERSION, dtype_code(dtype)))
        f.write(struct.pack("<QQ", len(sizes), len(doc_idx)))
        f.write(sizes.astype(np.int32).tobytes(order="C"))
        f.write(pointers.tobytes(order="C"))
        f.write(np.asarray(doc_idx, dtype=np.int64).tobytes(order="C"))


def write_dataset(prefix: str | Path, documents: Iterable, *, vocab_size: int | None = None, dtype=None,
                  force: bool = False) -> MMapDataset:
    """Write token documents (one item each) as a NeoX mmap dataset and open it.

    Args:
        prefix: output path without suffix.
        documents: iterable of 1-D token sequences.
        vocab_size: the tokenizer's size; picks NeoX's dtype (uint16 below 65500, else int32).
        dtype: explicit dtype instead.
        force: replace an existing dataset.
    """
    dtype = dtype if dtype is not None else best_fitting_dtype(vocab_size)
    with DatasetBuilder(prefix, dtype, force=force) as b:
        for doc in documents:
            b.add_document(doc)
    return MMapDataset(prefix)
