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


def _units(seed=0):
    import numpy as np

    from neox_progressive.expand.maps import head_maps, unit_map
    from neox_progressive.expand.ops import LayerUnits, Unit

    kw = dict(sampling="uniform", seed=seed, stage="", layer=0)
    gh = unit_map(16, 24, kind="hidden", **kw)
    gH, gKV = head_maps(4, 2, 6, 3, "g_fixed", **kw)
    gf = unit_map(20, 30, kind="ffn", **kw)
    c = np.bincount(gh, minlength=16)
    alpha = torch.from_numpy(np.sqrt((24 / 16) / c[gh]))
    return LayerUnits(Unit.of(gh, 16), Unit.of(gH, 4), Unit.of(gKV, 2), Unit.of(gf, 20), alpha, 4)


def _layer(seed):
    g = torch.Generator().manual_seed(seed)
    shapes = {"attn_norm.weight": (16,), "attn.q.weight": (16, 16), "attn.k.weight": (8, 16), "attn.v.weight": (8, 16),
              "attn.o.weight": (16, 16), "mlp_norm.weight": (16,), "mlp.gate.weight": (20, 16), "mlp.up.weight": (20, 16),
              "mlp.down.weight": (16, 20)}
    return {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


@pytest.mark.parametrize("aki,second,hidden", [(False, "current", "copy"), (True, "current", "copy"),
                                               (True, "upper", "copy"), (True, "current", "upper")])
def test_gather_implementation_equals_the_literal_operators(aki, second, hidden):
    """`widen_layer` (index gathers) against the spec's operators composed literally (EXPANSION_SPEC sections 3, 5)."""
    from neox_progressive.expand.ops import (
        cols_f,
        cols_heads,
        in_h,
        norm_h,
        out_h,
        pick_cols,
        pick_rows,
        rows_f,
        rows_heads,
        widen_layer,
    )

    u = _units()
    cur, up = _layer(1), _layer(2)
    got = widen_layer(cur, up if aki else None, u, aki_second=second, aki_hidden=hidden)
    h, a, d = u.hidden, u.alpha, 4

    def first(key, rows_fn, unit):
        value = in_h(rows_fn(cur[key]), h)
        return pick_rows(value, in_h(rows_fn(up[key]), h), unit.new, d if unit is not u.ffn else 1) if aki else value

    def second_(key, cols_fn, unit, block):
        value = cols_fn(cur[key])
        if aki and second == "upper":
            value = pick_cols(value, cols_fn(up[key]), unit.new, block)
        value = out_h(value, h, a)
        if aki and hidden == "upper":
            value = pick_rows(value, out_h(cols_fn(up[key]), h, a), h.new)
        return value

    want = {
        "attn_norm.weight": norm_h(cur["attn_norm.weight"], h, a), "mlp_norm.weight": norm_h(cur["mlp_norm.weight"], h, a),
        "attn.q.weight": first("attn.q.weight", lambda w: rows_heads(w, u.heads, d), u.heads),
        "attn.k.weight": first("attn.k.weight", lambda w: rows_heads(w, u.kv_heads, d), u.kv_heads),
        "attn.v.weight": first("attn.v.weight", lambda w: rows_heads(w, u.kv_heads, d), u.kv_heads),
        "attn.o.weight": second_("attn.o.weight", lambda w: cols_heads(w, u.heads, d), u.heads, d),
        "mlp.gate.weight": first("mlp.gate.weight", lambda w: rows_f(w, u.ffn), u.ffn),
        "mlp.up.weight": first("mlp.up.weight", lambda w: rows_f(w, u.ffn), u.ffn),
        "mlp.down.weight": second_("mlp.down.weight", lambda w: cols_f(w, u.ffn), u.ffn, 1),
    }
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-13, atol=1e-14, msg=k)


def test_gather_with_and_without_identity_prefixes():
    from neox_progressive.expand.ops import _gather, identity_prefix

    w = torch.randn(7, 5, dtype=torch.float64)
    for rows, cols in [([0, 1, 2, 3, 4, 5, 6, 2, 2], [0, 1, 2, 3, 4, 0]), ([1, 0, 2, 2], [3, 0, 1, 2, 4]), (None, [4, 4]),
                       ([0, 1, 6], None), (list(range(7)), list(range(5)))]:
        r = None if rows is None else torch.tensor(rows)
        c = None if cols is None else torch.tensor(cols)
        want = w if r is None else w[r]
        want = want if c is None else want[:, c]
        assert torch.equal(_gather(w, r, c, None), want)
    assert torch.equal(_gather(w[:, 0], torch.tensor([0, 1, 5]), None, torch.float32), w[[0, 1, 5], 0].float())
    assert identity_prefix(torch.tensor([0, 1, 2, 0])) == 3 and identity_prefix(torch.tensor([1, 0])) == 0


def test_layer_files_hold_only_their_own_bytes(tmp_path):
    """arch._own (no copy for tensors that own their storage) still clones views: a TP shard saved from a view
    of the full tensor would otherwise carry the whole base storage into its file."""
    from neox_progressive import arch

    full = torch.randn(64, 32)
    fresh = torch.randn(64, 32)
    assert arch._own(fresh) is fresh
    shard = arch._own(full[32:])
    assert shard.untyped_storage().nbytes() == 32 * 32 * 4 and torch.equal(shard, full[32:])
    assert arch._own(full[:, :16]).is_contiguous()
    torch.save(arch._own(full[:8]), tmp_path / "s.pt")
    assert (tmp_path / "s.pt").stat().st_size < 8 * 32 * 4 + 2048
