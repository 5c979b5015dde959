"""The NaN/Inf check of sources (io/finite.py): every kind of non-finite value, every float dtype, counted right.

The fast path (one min/max pass) decides "all finite"; a miss there would let a bad checkpoint through, so
each case puts a single bad value at a random place in an otherwise finite tensor and compares the count
with one computed independently in Python.
"""
import math
import random

import pytest
import torch

from neox_progressive.io.finite import CHUNK, nonfinite_count

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64]


def python_count(t: torch.Tensor) -> int:
    return sum(1 for v in t.double().reshape(-1).tolist() if not math.isfinite(v))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_one_bad_value_anywhere_is_found(dtype, bad):
    rng = random.Random(f"{dtype}-{bad}")
    for shape in [(1,), (7,), (33, 65), (3, 5, 7)]:
        t = torch.randn(*shape, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))).to(dtype)
        flat = t.view(-1)
        flat[rng.randrange(flat.numel())] = bad
        assert nonfinite_count(t) == python_count(t) == 1, (dtype, bad, shape)


@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_and_mixed_counts(dtype):
    t = (torch.randn(40, 50, generator=torch.Generator().manual_seed(3)) * 100).to(dtype)
    assert nonfinite_count(t) == 0
    t[0, 0], t[39, 49], t[7, 3], t[7, 4] = math.nan, -math.inf, math.inf, math.nan
    assert nonfinite_count(t) == python_count(t) == 4


def test_largest_finite_values_and_ints_are_not_flagged():
    for dtype in DTYPES:
        info = torch.finfo(dtype)
        assert nonfinite_count(torch.tensor([info.max, info.min, info.tiny, 0.0], dtype=dtype)) == 0
    assert nonfinite_count(torch.arange(10)) == 0
    assert nonfinite_count(torch.empty(0)) == 0
    assert nonfinite_count(torch.tensor(math.nan)) == 1  # a 0-dim tensor
    strided = torch.ones(6, 4)
    strided[5, 3] = math.inf
    assert nonfinite_count(strided.t()) == nonfinite_count(strided[:, 3]) == 1  # views that are not contiguous


def test_counts_across_chunks():
    t = torch.zeros(CHUNK + 5)
    t[3], t[CHUNK + 1] = math.nan, math.inf
    assert nonfinite_count(t) == 2
