"""The registered rules (index gathers, block copies, in-place 16-bit division) against the spec's operators written
out by hand (tests/expand_util.py; EXPANSION_SPEC sections 1, 3, 5), rule by rule, with every switch; and what rules
must never do to their inputs."""

import numpy as np
import pytest
import torch
from expand_util import cols_units, in_h, norm_h, out_h, pick, rows_units

from neox_progressive import arch
from neox_progressive.expand.maps import head_maps, unit_map
from neox_progressive.expand.rules import RULES, Maps, RuleOptions, Sources, Unit, divide, gather, identity_prefix

H, H2, NH, NKV, NH2, NKV2, F, F2, D = 16, 24, 4, 2, 6, 3, 20, 30, 4


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


def _maps(comp: bool, grow: bool = True):
    kw = dict(sampling="uniform", seed=0, stage="", layer=0)
    h2, nh2, nkv2, f2 = (H2, NH2, NKV2, F2) if grow else (H, NH, NKV, F)
    gh = unit_map(H, h2, kind="hidden", **kw)
    g_heads, g_kv = head_maps(NH, NKV, nh2, nkv2, "g_fixed", **kw)
    gf = unit_map(F, f2, kind="ffn", **kw)
    c = np.bincount(gh, minlength=H)
    alpha = np.sqrt((h2 / H) / c[gh]) if comp else np.ones(h2)
    assert len(set(alpha.tolist())) > 1 or not comp  # the draw has unequal counts, so a is not constant
    maps = {"hidden": gh, "heads": g_heads, "kv_heads": g_kv, "ffn": gf}
    return maps, torch.from_numpy(alpha)


SHAPES = {"attn_norm.weight": (H,), "attn_norm.bias": (H,), "attn.q.weight": (NH * D, H), "attn.k.weight": (NKV * D, H),
          "attn.v.weight": (NKV * D, H), "attn.q.bias": (NH * D,), "attn.k.bias": (NKV * D,), "attn.v.bias": (NKV * D,),
          "attn.o.weight": (H, NH * D), "attn.o.bias": (H,), "mlp_norm.weight": (H,), "mlp_norm.bias": (H,),
          "mlp.gate.weight": (F, H), "mlp.up.weight": (F, H), "mlp.gate.bias": (F,), "mlp.up.bias": (F,),
          "mlp.down.weight": (H, F), "mlp.down.bias": (H,)}


def _layer(seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in SHAPES.items()}


def _want(key, cur, up, m, a, second, hidden):
    """The spec's value of one tensor, from the operators written out by hand."""
    role = arch.LAYER_ROLES[key]
    gh = torch.from_numpy(m["hidden"])
    w, u = cur[key], up[key] if up is not None else None
    if role.rule == "norm_scale":
        return norm_h(w, gh, a)
    if role.rule == "norm_bias":
        return torch.stack([w[i] for i in gh.tolist()])
    if role.rule == "residual_bias":
        value = out_h(w, gh, a)
        return pick(value, out_h(u, gh, a), gh, 1) if u is not None and hidden == "upper" else value
    g = torch.from_numpy(m[role.units])
    block = D if role.units.endswith("heads") else 1
    if role.rule in ("reads_hidden", "unit_bias"):
        make = (lambda x: in_h(rows_units(x, g, block), gh)) if w.dim() == 2 else (lambda x: rows_units(x, g, block))
        return make(w) if u is None else pick(make(w), make(u), g, block)
    if role.rule == "writes_residual":
        value = cols_units(w, g, block)
        if u is not None and second == "upper":
            value = pick(value, cols_units(u, g, block), g, block, dim=1)
        value = out_h(value, gh, a)
        if u is not None and hidden == "upper":
            value = pick(value, out_h(cols_units(u, g, block), gh, a), gh, 1)
        return value
    raise AssertionError(role.rule)


def _got(key, cur, up, m, a, second, hidden):
    """One tensor through the registry, with the maps the role table names."""
    role = arch.LAYER_ROLES[key]
    units = role.units and Unit.of(m[role.units], {"heads": NH, "kv_heads": NKV, "ffn": F}[role.units])
    maps = Maps(Unit.of(m["hidden"], H), a, units, D if role.units and role.units.endswith("heads") else 1)
    src = Sources(cur[key], None if up is None or role.rule.startswith("norm") else up[key])
    return RULES[role.rule](src, maps, RuleOptions(second, hidden))


@pytest.mark.parametrize("aki,second,hidden", [(False, "current", "copy"), (True, "current", "copy"),
                                               (True, "upper", "copy"), (True, "current", "upper"),
                                               (True, "upper", "upper")])
@pytest.mark.parametrize("comp", [False, True])
def test_rules_equal_the_operators_written_out(aki, second, hidden, comp):
    m, a = _maps(comp)
    cur, up = _layer(1), _layer(2) if aki else None
    for key in SHAPES:
        if comp and key.endswith("norm.bias"):
            continue  # LayerNorm keeps a = 1 (the planner refuses rms_comp exact for it)
        got, want = _got(key, cur, up, m, a, second, hidden), _want(key, cur, up, m, a, second, hidden)
        assert got.shape == want.shape, key
        torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14, msg=key)


def test_aki_reads_the_upper_layer_only_for_new_units():
    """Old units of an AKI tensor are bit-identical to FPI, and at least one row differs (the new units')."""
    m, a = _maps(False)
    cur, up = _layer(1), _layer(2)
    for key in ("attn.q.weight", "attn.k.weight", "mlp.up.weight", "mlp.up.bias"):
        aki, fpi = _got(key, cur, up, m, a, "current", "copy"), _got(key, cur, None, m, a, "current", "copy")
        differ = (aki != fpi).reshape(len(aki), -1).any(1)
        assert differ.any() and not differ[: cur[key].shape[0]].any(), key


def test_model_rules_and_zero_writer():
    m, a = _maps(True)
    gh = torch.from_numpy(m["hidden"])
    hidden = Unit.of(m["hidden"], H)
    e = torch.randn(50, H, dtype=torch.float64)
    emb = RULES["embedding"](Sources(e), Maps(hidden, a, rows=64), RuleOptions())
    want = torch.stack([float(a[k]) * e[:, i] for k, i in enumerate(gh.tolist())], dim=1)
    torch.testing.assert_close(emb[:50], want, rtol=1e-13, atol=0)
    assert emb.shape == (64, H2) and not emb[50:].any()
    assert torch.equal(RULES["position_embedding"](Sources(e), Maps(hidden, a, rows=50), RuleOptions()), emb[:50])
    head = RULES["head"](Sources(e), Maps(hidden, a, rows=64), RuleOptions(dtype=torch.float32))
    assert head.dtype == torch.float32 and not head[50:].any()
    torch.testing.assert_close(head[:50], in_h(e, gh).float())
    ffn = Unit.of(m["ffn"], F)
    z = RULES["zero_writer"](Sources(torch.ones(H, F)), Maps(hidden, a, ffn), RuleOptions())
    assert z.shape == (H2, F2) and not z.any()
    with pytest.raises(ValueError, match="norm_bias"):
        RULES["norm_bias"](Sources(torch.ones(H)), Maps(hidden, a), RuleOptions())


@pytest.mark.parametrize("grow", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rules_never_write_into_or_return_their_inputs(dtype, grow):
    """The executor keeps source layer l+1 to be layer l's upper and then the next group's current layer, and the
    sources are memory-mapped: a rule that wrote into an input, or returned (a view of) one that a later rule then
    writes into, would corrupt the next layer. Every rule, AKI with both switches, on every key; also with maps
    that do not grow (identity maps, where returning the input would be a tempting shortcut)."""
    m, a = _maps(False, grow)
    cur = {k: v.to(dtype) for k, v in _layer(1).items()}
    up = {k: v.to(dtype) for k, v in _layer(2).items()}
    before = {k: (cur[k].clone(), up[k].clone()) for k in cur}
    for key in SHAPES:
        out = _got(key, cur, up, m, a, "upper", "upper")
        lo, hi = out.data_ptr(), out.data_ptr() + out.numel() * out.element_size()
        for t in (cur[key], up[key]):
            t_lo = t.untyped_storage().data_ptr()
            assert hi <= t_lo or lo >= t_lo + t.untyped_storage().nbytes(), f"{key}: the output shares an input's memory"
    for k, (c, u) in before.items():
        assert torch.equal(cur[k], c) and torch.equal(up[k], u), f"{k}: a rule wrote into its input"


def test_every_role_has_a_registered_rule():
    for table in (arch.LAYER_ROLES, arch.MODEL_ROLES):
        for key, role in table.items():
            assert role.rule in RULES, (key, role.rule)
            assert role.units in (None, "heads", "kv_heads", "ffn"), key
    assert arch.RESIDUAL_WRITERS == {"attn.o.weight", "attn.o.bias", "mlp.down.weight", "mlp.down.bias"}


def test_every_neox_key_of_both_architectures_has_one_role():
    """The role table covers the layout tables: every logical key has a role, and the logical keys fused into one
    NeoX tensor (QKV, SwiGLU linear1) share its rule, so NeoX key -> role is well defined."""
    assert {k for k, _, _ in arch.LOGICAL_LAYER} == set(arch.LAYER_ROLES)
    assert {k for k, _, _ in arch.LOGICAL_GLOBAL} == set(arch.MODEL_ROLES)
    for part, rows in arch.NEOX_PARTS.items():
        table = arch.LAYER_ROLES if part == "layer" else arch.MODEL_ROLES
        for key, logical, _, _ in rows:
            assert len({table[k].rule for k in logical}) <= 1, (part, key)


def test_gather_with_and_without_identity_prefixes():
    w = torch.randn(7, 5, dtype=torch.float64)
    for rows, cols in [([0, 1, 2, 3, 4, 5, 6, 2, 2], [0, 1, 2, 3, 4, 0]), ([1, 0, 2, 2], [3, 0, 1, 2, 4]), (None, [4, 4]),
                       ([0, 1, 6], None), (list(range(7)), list(range(5)))]:
        r = None if rows is None else torch.tensor(rows)
        c = None if cols is None else torch.tensor(cols)
        want = w if r is None else w[r]
        want = want if c is None else want[:, c]
        assert torch.equal(gather(w, r, c, None), want)
    assert torch.equal(gather(w[:, 0], torch.tensor([0, 1, 5]), None, torch.float32), w[[0, 1, 5], 0].float())
    assert identity_prefix(torch.tensor([0, 1, 2, 0])) == 3 and identity_prefix(torch.tensor([1, 0])) == 0


def test_layer_files_hold_only_their_own_bytes(tmp_path):
    """arch._own (no copy for tensors that own their storage) still clones views: a TP shard saved from a view
    of the full tensor would otherwise carry the whole base storage into its file."""
    full = torch.randn(64, 32)
    fresh = torch.randn(64, 32)
    assert arch._own(fresh) is fresh
    shard = arch._own(full[32:])
    assert shard.untyped_storage().nbytes() == 32 * 32 * 4 and torch.equal(shard, full[32:])
    assert arch._own(full[:, :16]).is_contiguous()
    torch.save(arch._own(full[:8]), tmp_path / "s.pt")
    assert (tmp_path / "s.pt").stat().st_size < 8 * 32 * 4 + 2048
