"""Unit maps of a bert2BERT expansion: which source unit each target unit copies.

A unit map g: [n'] -> [n] has the identity prefix g(i) = i for i < n; the new entries follow
bert2BERT's "f(.) is uniform sampling" (Chen et al. 2022, sec. 3.1: i.i.d. with replacement), or
with `balanced` the concatenation of random permutations of [n] (counts differ by at most one).
EXPANSION_SPEC.md sections 1, 2 and 8.

Every draw is a hash, not a stateful RNG (EXPANSION_SPEC section 8):

    draw = int(sha256(f"{seed}|{stage}|{kind}|{layer}|{i}").hexdigest()[:8], 16) mod n

so the maps do not depend on the device, dtype, TP degree, call order or library versions.

Head maps (EXPANSION_SPEC section 2): query head j uses KV head j // G (NeoX repeat_interleave).
GQA layouts: `mha` (g_KV = g_H), `g_fixed` (same group size: new KV groups copy whole source
groups), `kv_fixed` (same KV heads, bigger groups: AquilaMoE's AKI-Pro rule) and `general` (each
target group copies one source group; feasible iff every source group r, copied into c_r target
groups of G' heads, has c_r G' >= G, i.e. num_kv_heads' >= num_kv_heads x ceil(G / G')). `auto`
takes the first of these that fits, so the first three keep their maps. Anything else is refused
with the KV head counts that would work.
"""

from __future__ import annotations

import hashlib

import numpy as np

from neox_progressive.errors import UserError

GQA_LAYOUTS = ("auto", "mha", "g_fixed", "kv_fixed", "general")


def draw(seed: int, stage: str, kind: str, layer: int | str, i: int, n: int) -> int:
    """One hashed draw in [0, n)."""
    digest = hashlib.sha256(f"{seed}|{stage}|{kind}|{layer}|{i}".encode()).hexdigest()
    return int(digest[:8], 16) % n


def _permutation(n: int, seed: int, stage: str, kind: str, layer: int | str) -> list[int]:
    """Fisher-Yates shuffle of range(n) with hashed draws."""
    perm = list(range(n))
    for j in range(n - 1, 0, -1):
        k = draw(seed, stage, kind, layer, j, j + 1)
        perm[j], perm[k] = perm[k], perm[j]
    return perm


def unit_map(n: int, n_new: int, *, sampling: str, seed: int, stage: str, kind: str, layer: int | str) -> np.ndarray:
    """g: [n_new] -> [n] with the identity prefix; new entries uniform (with replacement) or balanced."""
    if n_new < n:
        raise ValueError(f"{kind}: cannot shrink {n} units to {n_new}")
    out = list(range(n))
    if sampling == "uniform":
        out += [draw(seed, stage, kind, layer, i, n) for i in range(n, n_new)]
    elif sampling == "balanced":
        p = 0
        while len(out) < n_new:
            out += _permutation(n, seed, stage, f"{kind}/perm{p}", layer)[: n_new - len(out)]
            p += 1
    else:
        raise ValueError(f"unknown map sampling {sampling!r}")
    return np.asarray(out, dtype=np.int64)


def counts(g: np.ndarray, n: int) -> np.ndarray:
    """c(i) = |g^-1(i)| for every source unit i (each is >= 1 for an expansion map)."""
    return np.bincount(g, minlength=n)


def new_units(g: np.ndarray) -> np.ndarray:
    """Boolean mask of the target units whose source unit already occurs earlier in the map (AKI's N)."""
    seen: set[int] = set()
    mask = np.zeros(len(g), dtype=bool)
    for j, i in enumerate(g.tolist()):
        mask[j] = i in seen
        seen.add(i)
    return mask


# ---- heads / GQA ------------------------------------------------------------------------------
def _need(g: int, g2: int) -> int:
    """Target groups a source group of g query heads needs at least, with g2 query heads per target group."""
    return -(-g // g2)


def _fits(nh: int, nkv: int, nh2: int, nkv2: int) -> dict[str, bool]:
    g, g2 = nh // nkv, nh2 // nkv2
    return {
        "mha": nkv == nh and nkv2 == nh2,
        "g_fixed": g2 == g and nkv2 >= nkv,
        "kv_fixed": nkv2 == nkv and g2 >= g,
        "general": nh2 % nkv2 == 0 and nkv2 >= nkv * _need(g, g2),
    }


def _rule(layout: str, nh: int, nkv: int, nh2: int, nkv2: int) -> str:
    g, g2 = nh // nkv, nh2 // nkv2
    need = _need(g, g2)
    return {
        "mha": "mha needs num_kv_heads = num_attention_heads in both members",
        "g_fixed": f"g_fixed keeps the group size {g}, with at least the source's {nkv} KV heads",
        "kv_fixed": f"kv_fixed keeps the {nkv} KV heads, with at least {g} query heads per group",
        "general": (f"each target group copies one source group and every source head must be kept, so each of the "
                    f"{nkv} source groups of {g} query heads needs {need} target group(s) of {g2}: at least "
                    f"{need * nkv} KV heads, not {nkv2}"),
    }[layout]


def gqa_layout(nh: int, nkv: int, nh2: int, nkv2: int, want: str = "auto") -> str:
    """The layout that maps (nh, nkv) -> (nh2, nkv2), or a UserError naming the KV head counts that would work.

    auto takes the first that fits of mha, g_fixed, kv_fixed (their maps are unchanged by the general case)
    and general (EXPANSION_SPEC section 2 case 4).
    """
    if want not in GQA_LAYOUTS:
        raise UserError(f"gqa layout {want!r} is unknown; use one of {', '.join(GQA_LAYOUTS)}")
    pair = f"heads {nh}/kv {nkv} -> {nh2}/kv {nkv2}"
    if nh2 < nh:
        raise UserError(f"{pair}: the target has fewer query heads than the source; expansion only adds heads: use "
                        f"num_attention_heads >= {nh} in the target")
    fits = _fits(nh, nkv, nh2, nkv2)
    if want == "auto":
        for name in ("mha", "g_fixed", "kv_fixed", "general"):
            if fits[name]:
                return name
    elif fits[want]:
        return want
    layout = "general" if want == "auto" else want
    good = feasible_kv_heads(nh, nkv, nh2, layout)
    if want == "auto":
        works = f"use num_kv_heads in {good} with {nh2} heads"
    else:
        works = (f"with {nh2} heads {layout} works for num_kv_heads in {good}" if good
                 else f"with {nh2} heads {layout} works for no num_kv_heads")
    if want != "auto" and fits["general"]:
        works += f"; --gqa-layout auto maps {nkv2} KV heads ({gqa_layout(nh, nkv, nh2, nkv2)})"
    elif want != "auto":
        works += f"; any layout works for num_kv_heads in {feasible_kv_heads(nh, nkv, nh2)}"
    what = "no GQA layout can map these" if want == "auto" else f"--gqa-layout {want} cannot map these"
    raise UserError(f"{pair}: {what} ({_rule(layout, nh, nkv, nh2, nkv2)}); {works}")


def feasible_kv_heads(nh: int, nkv: int, nh2: int, layout: str = "auto") -> list[int]:
    """Every num_kv_heads a target with nh2 query heads can have for the layout (auto: any layout)."""
    out = []
    for kv2 in range(1, nh2 + 1):
        if nh2 % kv2 == 0 and nh2 >= nh:
            fits = _fits(nh, nkv, nh2, kv2)
            if fits["general"] if layout == "auto" else fits[layout]:
                out.append(kv2)
    return out


def head_maps(nh: int, nkv: int, nh2: int, nkv2: int, layout: str, *, sampling: str, seed: int, stage: str,
              layer: int | str) -> tuple[np.ndarray, np.ndarray]:
    """(g_H over query heads, g_KV over KV heads) for one layer (EXPANSION_SPEC section 2)."""
    kw = dict(sampling=sampling, seed=seed, stage=stage, layer=layer)
    if layout == "mha":
        g = unit_map(nh, nh2, kind="heads", **kw)
        return g, g.copy()
    group, group2 = nh // nkv, nh2 // nkv2
    if layout == "g_fixed":
        g_kv = unit_map(nkv, nkv2, kind="kv_heads", **kw)
        g_h = np.asarray([g_kv[j // group] * group + j % group for j in range(nh2)], dtype=np.int64)
        return g_h, g_kv
    if layout == "kv_fixed":
        g_h = np.concatenate([r * group + unit_map(group, group2, kind=f"heads/group{r}", **kw) for r in range(nkv)])
        return g_h, np.arange(nkv, dtype=np.int64)
    if layout == "general":
        return _general_maps(nkv, group, nkv2, group2, kw)
    raise ValueError(layout)


def _general_maps(nkv: int, group: int, nkv2: int, group2: int, kw: dict) -> tuple[np.ndarray, np.ndarray]:
    """EXPANSION_SPEC section 2 case 4: each target group copies one source group, every source head is kept.

    Our reading of how the groups and slots are drawn: g_KV = the source groups `need` times (need =
    ceil(G / G'), the least that holds a group's G heads), then the identity-prefixed unit map's draws
    for the remaining target groups. The c_r G' query slots of the target groups copying source group r
    (in target order) are r G + a unit map [c_r G'] -> [G] (identity prefix: all G heads kept, the rest
    drawn as for any unit map). With nkv2 = nkv this is exactly kv_fixed's map.
    """
    need = _need(group, group2)
    if nkv2 < need * nkv:
        raise ValueError(f"general GQA layout infeasible: {nkv2} < {need} x {nkv}")
    g_kv = np.concatenate([np.tile(np.arange(nkv, dtype=np.int64), need - 1),
                           unit_map(nkv, nkv2 - (need - 1) * nkv, kind="kv_heads", **kw)])
    g_h = np.empty(nkv2 * group2, dtype=np.int64)
    for r in range(nkv):
        targets = np.flatnonzero(g_kv == r)
        slots = r * group + unit_map(group, len(targets) * group2, kind=f"heads/group{r}", **kw)
        for k, t in enumerate(targets):
            g_h[t * group2:(t + 1) * group2] = slots[k * group2:(k + 1) * group2]
    return g_h, g_kv


# ---- depth ------------------------------------------------------------------------------------
def depth_order(n: int, n_new: int, rule: str) -> list[int]:
    """Target layer t -> the (widened) source layer it copies (EXPANSION_SPEC section 6).

    b2b: bert2BERT Algorithm 1, k = n_new // n whole stacks then the top r = n_new - k n layers;
    interp: t -> floor(t n / n_new) (AquilaMoE AKI-Pro); cyclic: t -> t mod n (PRTS).
    """
    if n_new < n:
        raise ValueError(f"cannot shrink {n} layers to {n_new}")
    if rule == "b2b":
        k, r = divmod(n_new, n)
        return list(range(n)) * k + list(range(n - r, n))
    if rule == "interp":
        return [t * n // n_new for t in range(n_new)]
    if rule == "cyclic":
        return [t % n for t in range(n_new)]
    raise ValueError(f"unknown depth rule {rule!r}")


def added_layers(order: list[int]) -> list[bool]:
    """True where a target layer repeats a source layer already placed earlier (the 'new' layers)."""
    seen: set[int] = set()
    out = []
    for s in order:
        out.append(s in seen)
        seen.add(s)
    return out
