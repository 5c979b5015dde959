"""Every GQA layout of EXPANSION_SPEC section 2 (the general case 4 included) and the hashed draws of section 8.

FPI through the real executor (expand_checkpoint, read back, reference model) gives the source's logits for
pairs only the general case maps; infeasible pairs are refused with the KV head counts that work, which a
brute-force search over every group assignment confirms; the draws and maps are pinned against values
computed here from hashlib and the spec's formulas, so a change of the hash (e.g. its slice) fails."""

import hashlib
import itertools

import numpy as np
import pytest
from expand_util import logits, rel_err, run_expand, shape, tokens, wider

from neox_progressive.errors import UserError
from neox_progressive.expand import load_maps
from neox_progressive.expand import maps as M

TOL = 1e-5


def general_src(heads, kv, d, **kw):
    return shape(hidden_size=heads * d, num_heads=heads, num_kv_heads=kv, **kw)


def check_group_invariant(g_h, g_kv, nh, nkv, nh2, nkv2):
    """Every target query head's KV head copies its source head's KV head; no source head or KV head is lost."""
    G, G2 = nh // nkv, nh2 // nkv2
    assert all(g_kv[j // G2] == g_h[j] // G for j in range(nh2))
    assert set(g_h.tolist()) == set(range(nh)) and set(g_kv.tolist()) == set(range(nkv))


# (source heads, source kv, target heads, target kv, head_dim, extra shape keys)
GENERAL = {
    "25/5->32/16": (25, 5, 32, 16, 4, {}),        # the spec's example: G 5 -> G' 2, each source group in 3+ groups
    "5/1->8/4": (5, 1, 8, 4, 4, {}),              # the same, scaled down
    "gqa->mha 4/2->8/8": (4, 2, 8, 8, 8, {}),
    "mha->gqa 4/4->12/6": (4, 4, 12, 6, 4, {}),
    "8/2->12/6 bias tp2": (8, 2, 12, 6, 4, {"attn_bias": True, "mlp_bias": True, "tp": 2}),
}


@pytest.mark.parametrize("sampling", ["uniform", "balanced"])
@pytest.mark.parametrize("case", list(GENERAL))
def test_general_layout_fpi_is_exact(tmp_path, case, sampling):
    nh, nkv, nh2, nkv2, d, extra = GENERAL[case]
    src = general_src(nh, nkv, d, **extra)
    dst = wider(src, nh2, nkv2, ffn=60)
    assert M.gqa_layout(nh, nkv, nh2, nkv2) == "general"  # no other layout maps these pairs
    out, rec, sd, dshape, dsd = run_expand(tmp_path, src, dst, method="fpi", map_sampling=sampling)
    assert rec["gqa_layout"] == "general" and (dshape.num_heads, dshape.num_kv_heads) == (nh2, nkv2)
    x = tokens(src)
    err = rel_err(logits(dshape, dsd, x), logits(src, sd, x))
    assert err <= TOL, err
    m = load_maps(out)
    for i in range(src.num_layers):
        check_group_invariant(m[f"layer{i}.heads"], m[f"layer{i}.kv_heads"], nh, nkv, nh2, nkv2)


def test_general_layout_aki_runs_and_differs(tmp_path):
    src = general_src(5, 1, 4, num_layers=3)
    out, rec, sd, dshape, dsd = run_expand(tmp_path, src, wider(src, 8, 4, ffn=60), method="aki")
    x = tokens(src)
    got, want = logits(dshape, dsd, x), logits(src, sd, x)
    assert rec["gqa_layout"] == "general" and got.isfinite().all() and rel_err(got, want) > 1e-3


def brute_force_feasible(nh, nkv, nh2):
    """KV counts for which some assignment of target groups to source groups (c_r groups each) keeps every source head."""
    G, out = nh // nkv, []
    for kv2 in range(1, nh2 + 1):
        if nh2 % kv2 or nh2 < nh:
            continue
        G2 = nh2 // kv2
        counts = (c for c in itertools.product(range(kv2 + 1), repeat=nkv) if sum(c) == kv2)  # c_r per source group
        if any(all(c_r * G2 >= G for c_r in c) for c in counts):
            out.append(kv2)
    return out


def test_feasible_kv_heads_lists_every_count_that_works():
    for nh, nkv in [(4, 4), (4, 2), (4, 1), (6, 3), (6, 2), (5, 1), (8, 2)]:
        for nh2 in range(nh, 13):
            good = M.feasible_kv_heads(nh, nkv, nh2)
            assert good == brute_force_feasible(nh, nkv, nh2), (nh, nkv, nh2)
            for kv2 in good:  # every listed count really maps, with the spec's invariant
                layout = M.gqa_layout(nh, nkv, nh2, kv2)
                g_h, g_kv = M.head_maps(nh, nkv, nh2, kv2, layout, sampling="uniform", seed=0, stage="", layer=0)
                check_group_invariant(g_h, g_kv, nh, nkv, nh2, kv2)
    assert M.feasible_kv_heads(25, 5, 32) == [16, 32]


@pytest.mark.parametrize("pair,works", [
    ((25, 5, 32, 8), [16, 32]),          # the spec's infeasible example: 5 groups of 5 into groups of 4 need 10 KV heads
    ((4, 4, 6, 3), [6]),                 # 4 distinct KV heads cannot fit into 3
    ((10, 2, 12, 3), [2, 4, 6, 12]),
    ((4, 2, 6, 1), [2, 3, 6]),
])
def test_infeasible_pairs_are_refused_with_the_counts_that_work(pair, works):
    with pytest.raises(UserError) as exc:
        M.gqa_layout(*pair)
    msg = str(exc.value)
    assert "\n" not in msg and "no GQA layout can map these" in msg and f"use num_kv_heads in {works}" in msg
    assert pair[3] not in works and works == brute_force_feasible(*pair[:3])


@pytest.mark.parametrize("want,pair,listed,auto", [
    ("kv_fixed", (4, 2, 8, 4), [2], "g_fixed"),
    ("g_fixed", (4, 2, 8, 2), [4], "kv_fixed"),
    ("mha", (4, 2, 8, 8), [], "general"),
])
def test_a_refused_explicit_layout_says_cannot_and_names_other_counts(want, pair, listed, auto):
    with pytest.raises(UserError) as exc:
        M.gqa_layout(*pair, want=want)
    msg = str(exc.value)
    assert f"--gqa-layout {want} cannot map these" in msg and f"--gqa-layout auto maps {pair[3]} KV heads ({auto})" in msg
    assert (f"{want} works for num_kv_heads in {listed}" if listed else f"{want} works for no num_kv_heads") in msg
    assert pair[3] not in listed and M.gqa_layout(*pair) == auto


# ---- golden values: the hashed draws (EXPANSION_SPEC section 8) computed here from hashlib ----------------
def h(seed, stage, kind, layer, i, n):
    return int(hashlib.sha256(f"{seed}|{stage}|{kind}|{layer}|{i}".encode()).hexdigest()[:8], 16) % n


def uniform(n, n_new, seed, stage, kind, layer):
    return list(range(n)) + [h(seed, stage, kind, layer, i, n) for i in range(n, n_new)]


def balanced(n, n_new, seed, stage, kind, layer):
    out, p = list(range(n)), 0
    while len(out) < n_new:
        perm = list(range(n))
        for j in range(n - 1, 0, -1):  # Fisher-Yates with hashed draws
            k = h(seed, stage, f"{kind}/perm{p}", layer, j, j + 1)
            perm[j], perm[k] = perm[k], perm[j]
        out += perm[: n_new - len(out)]
        p += 1
    return out


def test_draws_and_unit_maps_equal_hashlib_golden_values():
    for args in [(0, "", "ffn", 0, 5, 5), (7, "2B", "hidden", "model", 9, 6), (3, "x", "heads/group1", 4, 123, 1000)]:
        assert M.draw(*args) == h(*args)
    # a literal vector, computed once from hashlib: int(sha256("0||ffn|0|i")[:8], 16) % 5 for i = 5..11
    assert M.unit_map(5, 12, sampling="uniform", seed=0, stage="", kind="ffn", layer=0).tolist() == \
        [0, 1, 2, 3, 4, 2, 0, 2, 3, 1, 2, 3]
    for n, n_new in [(5, 12), (6, 10), (3, 11)]:
        for fn, sampling in ((uniform, "uniform"), (balanced, "balanced")):
            got = M.unit_map(n, n_new, sampling=sampling, seed=7, stage="2B", kind="hidden", layer="model")
            assert got.tolist() == fn(n, n_new, 7, "2B", "hidden", "model"), (n, n_new, sampling)


def test_head_maps_equal_the_spec_formulas_computed_from_hashlib():
    kw = dict(seed=5, stage="s", layer=2)
    g_h, g_kv = M.head_maps(4, 4, 6, 6, "mha", sampling="uniform", **kw)
    assert g_h.tolist() == g_kv.tolist() == uniform(4, 6, 5, "s", "heads", 2)
    g_h, g_kv = M.head_maps(4, 2, 8, 4, "g_fixed", sampling="uniform", **kw)  # new groups copy whole source groups
    assert g_kv.tolist() == uniform(2, 4, 5, "s", "kv_heads", 2)
    assert g_h.tolist() == [g_kv[j // 2] * 2 + j % 2 for j in range(8)]
    g_h, g_kv = M.head_maps(4, 2, 8, 2, "kv_fixed", sampling="uniform", **kw)  # slot s of group r: r G + s, s < G
    assert g_kv.tolist() == [0, 1]
    assert g_h.tolist() == sum([[r * 2 + s for s in uniform(2, 4, 5, "s", f"heads/group{r}", 2)] for r in range(2)], [])
    # general, 4/2 -> 8/8: G 2 -> G' 1, so each source group needs 2 target groups: g_KV = [0, 1] then a unit map
    g_h, g_kv = M.head_maps(4, 2, 8, 8, "general", sampling="uniform", **kw)
    assert g_kv.tolist() == [0, 1] + uniform(2, 6, 5, "s", "kv_heads", 2)
    for r in range(2):
        slots = [r * 2 + s for s in uniform(2, int((g_kv == r).sum()), 5, "s", f"heads/group{r}", 2)]
        assert g_h[np.flatnonzero(g_kv == r)].tolist() == slots
