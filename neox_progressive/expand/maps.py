"""Unit maps of a bert2BERT expansion: which source unit each target unit copies.

A unit map g: [n'] -> [n] has the identity prefix g(i) = i for i < n; the new entries follow
bert2BERT's "f(.) is uniform sampling" (Chen et al. 2022, sec. 3.1: i.i.d. with replacement), or
with `balanced` the concatenation of random permutations of [n] (counts differ by at most one).
EXPANSION_SPEC.md sections 1, 2 and 8.

Every draw is a hash, not a stateful RNG (EXPANSION_SPEC section 8):

    draw = int(sha256(f"{seed}|{stage}|{kind}|{layer}|{i}").hexdigest()[:8], 16) mod n

so the maps do not depend on the device, dtype, TP degree, call order or library versions.

Head maps (EXPANSION_SPEC section 2): query head j uses KV head j // G (NeoX repeat_interleave).
Supported GQA layouts: `mha` (g_KV = g_H), `g_fixed` (same group size: new KV groups copy whole
source groups), `kv_fixed` (same KV heads, bigger groups: AquilaMoE's AKI-Pro rule). Anything
else is refused with the head counts that would work.
"""

from __future__ import annotations

import hashlib

import numpy as np

from neox_progressive.errors import UserError

SAMPLINGS = ("uniform", "balanced")
GQA_LAYOUTS = ("auto", "mha", "g_fixed", "kv_fixed")


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
def gqa_layout(nh: int, nkv: int, nh2: int, nkv2: int, want: str = "auto") -> str:
    """The layout that maps (nh, nkv) -> (nh2, nkv2), or a UserError naming what would work."""
    g, g2 = nh // nkv, nh2 // nkv2
    fits = {
        "mha": nkv == nh and nkv2 == nh2,
        "g_fixed": g2 == g and nkv2 >= nkv,
        "kv_fixed": nkv2 == nkv and g2 >= g,
    }
    if want == "auto":
        for name in ("mha", "g_fixed", "kv_fixed"):
            if fits[name]:
                return name
    elif want not in fits:
        raise UserError(f"gqa layout {want!r} is unknown; use one of {', '.join(GQA_LAYOUTS)}")
    elif fits[want]:
        return want
    good = feasible_kv_heads(nh, nkv, nh2)
    what = f"--gqa-layout {want}" if want != "auto" else "no supported GQA layout (mha, g_fixed, kv_fixed)"
    if good:
        fix = f"with {nh2} heads use num_kv_heads in {good} (keep the group size {g} or the {nkv} KV heads)"
    else:
        near = -(-nh2 // nkv) * nkv
        fix = (f"no num_kv_heads works with {nh2} heads: use a head count divisible by {nkv} (e.g. {near}, "
               f"num_kv_heads {nkv} or {near // g}), or MHA in both members")
    raise UserError(
        f"heads {nh}/kv {nkv} -> {nh2}/kv {nkv2}: {what} maps these (a target group must copy one whole source "
        f"group); {fix}"
    )


def feasible_kv_heads(nh: int, nkv: int, nh2: int) -> list[int]:
    g = nh // nkv
    out = []
    for kv2 in range(1, nh2 + 1):
        if nh2 % kv2:
            continue
        g2 = nh2 // kv2
        if (g2 == g and kv2 >= nkv) or (kv2 == nkv and g2 >= g):
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
    raise ValueError(layout)


# ---- depth ------------------------------------------------------------------------------------
DEPTH_RULES = ("b2b", "interp", "cyclic")


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
