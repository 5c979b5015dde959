"""Training samples from a NeoX mmap dataset.

A sample is seq_length + 1 consecutive tokens of the dataset's token stream (the items in file
order, concatenated), as in NeoX's GPT2Dataset: sample i covers tokens [i*S, i*S + S + 1), so
consecutive samples share one token, and an epoch holds (tokens - 1) // S samples.

What differs from NeoX (whose exact order depends on its C++ index builder): NeoX shuffles the
documents of each epoch and then the samples; here the document order is kept and only the
samples of each epoch are shuffled, with NumPy's PCG64 seeded by (seed, epoch). Sample j of the
run is epoch j // n, position j % n of that epoch's permutation, so the data position after any
iteration is just the number of samples consumed, and resuming is exact. A fixed-data window dataset in
the paper's epoch order (neox_progressive.data.sample_order) is shuffled within each of its segments,
segment after segment, as NeoX reads it then. Validation samples are
taken in order, without shuffling, from the start of the validation dataset, so every evaluation
(and every stage of a family) scores the same tokens.

`split_items` is NeoX's get_train_valid_test_split_ (data_utils.py) for `data_path` + `split`.
"""

from __future__ import annotations

import numpy as np
import torch

from neox_progressive.data.mmap_dataset import MMapDataset
from neox_progressive.data.sample_order import order_segments
from neox_progressive.errors import UserError


def split_items(split: str, n_items: int) -> list[int]:
    """Item boundaries [0, a, b, n] of the train/valid/test parts, exactly as NeoX computes them."""
    sep = "," if "," in split else "/" if "/" in split else None
    try:
        parts = [float(s) for s in split.split(sep)] if sep else [float(split)]
    except ValueError:
        raise UserError(f"config key split: {split!r} is not like '969, 30, 1'") from None
    parts = (parts + [0.0, 0.0])[:3]
    total = sum(parts)
    if total <= 0:
        raise UserError(f"config key split: {split!r} sums to zero")
    parts = [p / total for p in parts]
    index = [0]
    for p in parts:
        index.append(index[-1] + int(round(p * float(n_items))))
    diff = index[-1] - n_items
    return [index[0]] + [i - diff for i in index[1:]]


class SampleSource:
    """Samples of `seq_length + 1` tokens from items [first_item, end_item) of a dataset.

    Args:
        dataset: an open MMapDataset.
        seq_length: model context S.
        seed: shuffling seed; None keeps the samples in order (validation).
    """

    def __init__(self, dataset: MMapDataset, seq_length: int, seed: int | None, first_item: int = 0,
                 end_item: int | None = None, name: str = "train"):
        self.dataset = dataset
        self.seq_length = seq_length
        self.seed = seed
        self.tokens = dataset.tokens(first_item, end_item)
        self.samples_per_epoch = (len(self.tokens) - 1) // seq_length if len(self.tokens) else 0
        if self.samples_per_epoch < 1:
            raise UserError(
                f"{name} data {dataset.prefix} has {len(self.tokens)} tokens (items {first_item}..{end_item}), fewer than "
                f"one sample of seq_length + 1 = {seq_length + 1}; prepare more data or lower seq_length"
            )
        self._perm: tuple[int, np.ndarray] | None = None
        whole = first_item == 0 and end_item in (None, len(dataset))
        self.segments = order_segments(dataset.prefix, seq_length, self.samples_per_epoch) if whole else None

    def _order(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            dtype = np.int32 if self.samples_per_epoch < 2**31 else np.int64
            parts = []
            for a, b in self.segments or [[0, self.samples_per_epoch]]:
                part = np.arange(a, b, dtype=dtype)
                rng.shuffle(part)
                parts.append(part)
            self._perm = (epoch, np.concatenate(parts))
        return self._perm[1]

    def sample_index(self, j: int) -> int:
        """Position in the token stream (in units of seq_length) of the run's j-th sample."""
        epoch, k = divmod(j, self.samples_per_epoch)
        return k if self.seed is None else int(self._order(epoch)[k])

    def batch(self, start: int, size: int) -> torch.Tensor:
        """Samples start .. start+size-1 of the run, as int64 [size, seq_length + 1]."""
        s = self.seq_length
        rows = [self.tokens[i * s: i * s + s + 1] for i in (self.sample_index(j) for j in range(start, start + size))]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def epochs_for(self, n_samples: int) -> float:
        return n_samples / self.samples_per_epoch


def open_source(spec, seq_length: int, seed: int | None, split: str, name: str) -> SampleSource | None:
    """A SampleSource for a settings.DatasetPart (whole dataset, or its part of `data_path` + `split`).

    None when `split` leaves no validation documents (NeoX then skips validation too)."""
    ds = MMapDataset(spec.prefix)
    first, end = 0, len(ds)
    if spec.split_index is not None:
        bounds = split_items(split, len(ds))
        first, end = bounds[spec.split_index], bounds[spec.split_index + 1]
        if end <= first and name != "train":
            return None
        if end <= first:
            raise UserError(f"split {split!r} leaves no {name} documents of {spec.prefix} ({len(ds)} documents)")
    return SampleSource(ds, seq_length, seed, first, end, name)
