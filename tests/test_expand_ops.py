"""The 16-bit fast path of the expansion's division equals fp32 math cast once (the spec's rule)."""

import pytest
import torch

from neox_progressive.expand.ops import divide


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_division_equals_fp32_math_cast_once(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(257, 1000, generator=g) * 3).to(dtype)
    counts = torch.randint(1, 9, (1000,), generator=g).float()
    counts[:5] = torch.tensor([1.0, 3.0, 7.0, 100.0, 256.0])
    want = (x.float() / counts).to(dtype)
    got = divide(x.clone(), counts, torch.float32)
    assert got.dtype == dtype and torch.equal(got, want)
    big = counts.clone()
    big[0] = 1000.0  # not exact in bf16: takes the fp32 route
    assert divide(x.clone(), big, torch.float32).dtype == torch.float32
