"""AKI (EXPANSION_SPEC section 10 item 5), depth orders (item 6), determinism (item 7), map statistics (item 8)."""

import json

import numpy as np
import pytest
import torch
from expand_util import logits, rel_err, run_expand, shape, tokens, wider, write_source

from neox_progressive.expand import ExpandOptions, load_maps, plan_expansion
from neox_progressive.expand.maps import depth_order, unit_map
from neox_progressive.io.reader import read_checkpoint

LAYER_KEYS = ("attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight", "mlp.gate.weight", "mlp.up.weight",
              "mlp.down.weight", "attn_norm.weight", "mlp_norm.weight")


def both(tmp_path, src, dst, **kw):
    """AKI and FPI expansions of the same source with the same maps (rms_comp none for both)."""
    _, _, sd, dshape, aki = run_expand(tmp_path, src, dst, "aki", method="aki", **kw)
    out, _, _, _, fpi = run_expand(tmp_path, src, dst, "fpi", method="fpi", rms_comp="none", **kw)
    return sd, dshape, aki, fpi, load_maps(out)


def new_mask(g):
    seen, out = set(), []
    for i in g.tolist():
        out.append(i in seen)
        seen.add(i)
    return torch.tensor(out)


@pytest.mark.parametrize("kv,dst_heads,dst_kv", [(4, 6, 6), (2, 6, 3), (2, 6, 2)])
def test_aki_old_units_fpi_new_units_from_upper_layer(tmp_path, kv, dst_heads, dst_kv):
    src = shape(num_layers=3, num_kv_heads=kv, attn_bias=True)
    dst = wider(src, dst_heads, dst_kv, ffn=60)
    sd, dshape, aki, fpi, m = both(tmp_path, src, dst)
    d, h = src.head_dim, src.hidden_size
    gh = torch.from_numpy(m["hidden"])
    c = torch.bincount(gh, minlength=h).float()
    for key in ("embed.weight", "final_norm.weight", "head.weight"):
        assert torch.equal(aki[key], fpi[key]), key
    top = src.num_layers - 1
    for key in LAYER_KEYS:  # top layer: FPI
        assert torch.equal(aki[f"layers.{top}.{key}"], fpi[f"layers.{top}.{key}"]), key
    for layer in range(top):
        p, u = f"layers.{layer}.", f"layers.{layer + 1}."
        for key in ("attn.o.weight", "mlp.down.weight", "attn_norm.weight", "mlp_norm.weight", "attn.o.bias"):
            assert torch.equal(aki[p + key], fpi[p + key]), key  # aki_second=current, aki_hidden=copy
        for key, gkey in (("attn.q", "heads"), ("attn.k", "kv_heads"), ("attn.v", "kv_heads"), ("mlp.gate", "ffn"),
                          ("mlp.up", "ffn")):
            g = torch.from_numpy(m[f"layer{layer}.{gkey}"])
            block = 1 if key.startswith("mlp") else d
            new = new_mask(g).repeat_interleave(block)
            w, want_fpi = aki[p + key + ".weight"], fpi[p + key + ".weight"]
            assert torch.equal(w[~new], want_fpi[~new]), key  # old units bit-identical to FPI
            if key == "attn.k" and dst_kv == kv:
                assert not new.any()  # kv-fixed: no new KV heads
            rows = torch.arange(len(g) * block)
            src_rows = g.repeat_interleave(block) * block + rows % block
            upper = sd[u + key + ".weight"]
            want_new = (upper[src_rows][:, gh] / c[gh])[new]  # IN_h(layer l+1 rows at g(j)), independent indexing
            torch.testing.assert_close(w[new], want_new, rtol=1e-6, atol=1e-7)
            if key.startswith("attn"):
                torch.testing.assert_close(aki[p + key + ".bias"][new], sd[u + key + ".bias"][src_rows][new])
    x = tokens(src)
    out = logits(dshape, aki, x)
    assert torch.isfinite(out).all() and rel_err(out, logits(src, sd, x)) > 1e-3


def test_aki_with_one_layer_is_fpi(tmp_path):
    src = shape(num_layers=1)
    sd, _, aki, fpi, _ = both(tmp_path, src, wider(src, 5, ffn=60))
    assert aki.keys() == fpi.keys() and all(torch.equal(aki[k], fpi[k]) for k in aki)


@pytest.mark.parametrize("option,value", [("aki_second", "upper"), ("aki_hidden", "upper")])
def test_aki_switches_change_only_their_tensors(tmp_path, option, value):
    src = shape(num_layers=2, attn_bias=True, mlp_bias=True)
    dst = wider(src, 6, ffn=60)
    _, _, _, _, base = run_expand(tmp_path, src, dst, "base")
    _, _, _, _, alt = run_expand(tmp_path, src, dst, "alt", **{option: value})
    changed = {k for k in base if not torch.equal(base[k], alt[k])}
    allowed = {"layers.0.attn.o.weight", "layers.0.mlp.down.weight"}
    if option == "aki_hidden":
        allowed |= {"layers.0.attn.o.bias", "layers.0.mlp.down.bias"}
    assert changed and changed <= allowed, changed
    assert {"layers.0.attn.o.weight", "layers.0.mlp.down.weight"} <= changed


def test_depth_orders_of_the_family():
    assert depth_order(18, 22, "b2b") == list(range(18)) + [14, 15, 16, 17]
    assert depth_order(22, 27, "b2b") == list(range(22)) + [17, 18, 19, 20, 21]
    assert depth_order(27, 33, "b2b") == list(range(27)) + [21, 22, 23, 24, 25, 26]
    assert depth_order(18, 22, "interp")[:8] == [0, 0, 1, 2, 3, 4, 4, 5]
    assert depth_order(18, 22, "cyclic") == list(range(18)) + [0, 1, 2, 3]
    assert depth_order(2, 5, "b2b") == [0, 1, 0, 1, 1]


def test_depth_copies_are_the_widened_layers(tmp_path):
    src = shape(num_layers=2)
    _, rec, _, _, dsd = run_expand(tmp_path, src, wider(src, 5, ffn=60, num_layers=5))
    assert rec["depth_order"] == [0, 1, 0, 1, 1]
    for t, s in enumerate(rec["depth_order"]):
        for key in LAYER_KEYS:
            assert torch.equal(dsd[f"layers.{t}.{key}"], dsd[f"layers.{s}.{key}"])


def _memory(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.data_ptr() + s.nbytes()


def _shared(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _memory(a), _memory(b)
    return a0 < b1 and b0 < a1


def test_no_aliasing_where_it_can_happen(tmp_path, monkeypatch):
    """Copies must be independent tensors (EXPANSION_SPEC section 6). Checked where aliasing can happen: (1) in the
    dicts the executor hands the writer, no tensor shares memory with another of the same part or with a source
    tensor (the memory-mapped checkpoint the next layer is read from); (2) in a pp=0 save, where every layer lands in
    one torch.save and shared storages would load back shared, every tensor has its own storage."""
    from tiny import write_yaml

    from neox_progressive.expand import expand_checkpoint
    from neox_progressive.io.reader import CheckpointReader
    from neox_progressive.io.safe import load_pt
    from neox_progressive.io.writer import CheckpointWriter

    src = shape(num_layers=2, attn_bias=True, mlp_bias=True, num_kv_heads=2)
    dst = wider(src, 6, 3, ffn=60, num_layers=5, pp=0)
    src_dir, src_yml, _ = write_source(tmp_path, src)
    handed, read = [], []
    write_layer, read_layer = CheckpointWriter.write_layer, CheckpointReader.layer
    monkeypatch.setattr(CheckpointWriter, "write_layer", lambda w, i, layer: (handed.append(dict(layer)),
                                                                              write_layer(w, i, layer))[1])
    monkeypatch.setattr(CheckpointReader, "layer", lambda r, i: read.append(read_layer(r, i)) or read[-1])
    opts = ExpandOptions(method="aki", aki_second="upper", aki_hidden="upper", new_layer_init="zero_out")
    rec = expand_checkpoint(src_dir, [src_yml], [write_yaml(tmp_path / "dst.yml", dst)], tmp_path / "out", opts, quiet=True)
    assert len(handed) == 5 and rec["depth_order"] == [0, 1, 0, 1, 1] and read
    sources = [t for layer in read for t in layer.values()]
    for layer in handed:
        values = list(layer.items())
        for i, (k, v) in enumerate(values):
            assert not any(_shared(v, w) for _, w in values[i + 1:]), f"{k} shares memory within its part"
            assert not any(_shared(v, s) for s in sources), f"{k} shares memory with a source tensor"
    module = load_pt(tmp_path / "out" / "global_step0" / "mp_rank_00_model_states.pt")["module"]
    storages = [_memory(t) for t in module.values()]
    assert len(module) > 5 * len(LAYER_KEYS) and len(set(storages)) == len(storages)


def test_determinism_same_seed_any_tp_and_manifest_reload(tmp_path):
    src = shape(num_kv_heads=2, num_layers=2)
    dst = wider(src, 6, 2, ffn=64)
    out1, rec1, _, _, sd1 = run_expand(tmp_path, src, dst, "a", seed=7, stage="2B")
    out2, _, _, _, sd2 = run_expand(tmp_path, src, dst.replace(tp=2), "b", seed=7, stage="2B")
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    m1, m2 = load_maps(out1), load_maps(out2)
    assert all(np.array_equal(m1[k], m2[k]) for k in m1)
    rec = json.loads((out1 / "expansion.json").read_text())
    assert rec == json.loads(json.dumps(rec1, default=str))
    opts = ExpandOptions.from_dict(rec["options"])
    assert opts.seed == 7 and opts.method == "aki"
    _, _, _, _, sd3 = run_expand(tmp_path, src, dst, "c", stage=rec["stage"], **rec["options"])
    assert all(torch.equal(sd1[k], sd3[k]) for k in sd1)
    _, _, _, _, sd4 = run_expand(tmp_path, src, dst, "d", seed=8, stage="2B")
    assert any(not torch.equal(sd1[k], sd4[k]) for k in sd1)
    # the files are byte-identical tensors when expanded twice (TP 1 both times)
    out5, _, _, _, _ = run_expand(tmp_path, src, dst, "e", seed=7, stage="2B")
    for f in sorted((out1 / "global_step0").glob("layer_*.pt")):
        a = torch.load(f, weights_only=True)
        b = torch.load(out5 / "global_step0" / f.name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_maps_independent_of_call_order_and_seeded_by_stage():
    src = shape(num_layers=3)
    dst = wider(src, 6, ffn=60, num_layers=4).replace(padded_vocab_size=None)
    p1 = plan_expansion(src, dst, ExpandOptions(seed=1), "x")
    unit_map(100, 150, sampling="uniform", seed=1, stage="x", kind="ffn", layer=2)  # unrelated draws in between
    p2 = plan_expansion(src, dst.replace(tp=2), ExpandOptions(seed=1), "x")
    p3 = plan_expansion(src, dst, ExpandOptions(seed=1), "y")
    assert all(np.array_equal(p1.maps_arrays()[k], p2.maps_arrays()[k]) for k in p1.maps_arrays())
    assert not np.array_equal(p1.hidden, p3.hidden)
    assert not np.array_equal(p1.layers[0].ffn, p1.layers[1].ffn)  # independent per-layer draws


def test_map_statistics():
    g = unit_map(50, 5050, sampling="uniform", seed=0, stage="", kind="t", layer=0)
    assert np.array_equal(g[:50], np.arange(50)) and g.min() >= 0 and g.max() < 50
    hist = np.bincount(g[50:], minlength=50)
    chi2 = float(((hist - 100) ** 2 / 100).sum())
    assert chi2 < 120  # 49 degrees of freedom: the 1e-6 tail is ~110
    b = unit_map(50, 135, sampling="balanced", seed=0, stage="", kind="t", layer=0)
    counts = np.bincount(b, minlength=50)
    assert np.array_equal(b[:50], np.arange(50)) and counts.max() - counts.min() <= 1
    from neox_progressive.expand.maps import head_maps
    g_h, g_kv = head_maps(8, 2, 12, 2, "kv_fixed", sampling="uniform", seed=0, stage="", layer=0)
    assert list(g_kv) == [0, 1] and list(g_h[:4]) == [0, 1, 2, 3] and list(g_h[6:10]) == [4, 5, 6, 7]
    assert all(g_h[j] // 4 == j // 6 for j in range(12))


def test_chained_family_reads_back(tmp_path):
    """Chaining: the expanded checkpoint is a valid source for the next stage."""
    a = shape(num_layers=2)
    b = wider(a, 5, ffn=60, num_layers=3)
    out_b, _, _, bshape, bsd = run_expand(tmp_path, a, b, "b")
    c = wider(bshape, 6, ffn=72, num_layers=4)
    from tiny import write_yaml

    from neox_progressive.expand import expand_checkpoint
    rec = expand_checkpoint(out_b, [tmp_path / "b.yml"], [write_yaml(tmp_path / "c.yml", c)], tmp_path / "c", quiet=True,
                            stage="c")
    cshape, csd = read_checkpoint(tmp_path / "c", [tmp_path / "c.yml"])
    assert rec["depth_order"] == [0, 1, 2, 2] and cshape.hidden_size == 48
    assert torch.isfinite(logits(cshape, csd, tokens(cshape))).all()


def test_plan_names_the_upper_layer_only_where_aki_reads_it():
    """The tensor list is honest about its sources: kv-fixed GQA draws no new KV heads, so K/V read layer l only;
    writers read l+1 only under a switch; the top layer and FPI read one layer."""
    src = shape(num_layers=2, num_kv_heads=2, attn_bias=True, mlp_bias=True)
    dst = wider(src, 6, 2, ffn=60).replace(padded_vocab_size=None)
    ops = {op.key: op for op in plan_expansion(src, dst, ExpandOptions(method="aki")).tensors}
    assert len(ops["layers.0.attn.q.weight"].sources) == 2 and len(ops["layers.0.attn.k.weight"].sources) == 1
    assert len(ops["layers.0.mlp.up.bias"].sources) == 2 and len(ops["layers.1.mlp.up.weight"].sources) == 1
    assert len(ops["layers.0.attn.o.weight"].sources) == 1 and len(ops["layers.0.mlp.down.bias"].sources) == 1
    ops = {op.key: op for op in plan_expansion(src, dst, ExpandOptions(method="aki", aki_hidden="upper")).tensors}
    assert len(ops["layers.0.attn.o.weight"].sources) == 2 and len(ops["layers.0.mlp.down.bias"].sources) == 2
    fpi = plan_expansion(src, dst, ExpandOptions(method="fpi")).tensors
    assert all(len(op.sources) == 1 for op in fpi)
