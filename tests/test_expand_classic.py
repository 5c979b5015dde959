"""Expansion of NeoX's classic transformer (Pythia-style: LayerNorm with bias, GeLU MLP, biases, parallel residual,
partial rotary or learned positions; issue 11): FPI is exact where LayerNorm allows it and measurably not exact
elsewhere; AKI has EXPANSION_SPEC section 10's properties; the plan and expansion.json say which."""

import json

import numpy as np
import pytest
import torch
from expand_util import first_seen, in_h, logits, rel_err, rows_units, run_expand, shape, tokens, wider

from neox_progressive.errors import UserError
from neox_progressive.expand import ExpandOptions, load_maps, plan_expansion

TOL = 1e-5
CLASSIC = dict(norm="layernorm", layernorm_eps=1e-5, activation="gelu", gelu_approx="tanh", attn_bias=True,
               mlp_bias=True, parallel_residual=True, rotary_pct=0.25, ffn_size=64)


def classic(**kw):
    return shape(**(CLASSIC | kw))


def exact_fpi(**kw):
    """The options under which FPI of a LayerNorm model is exact: balanced maps, added layers zeroed."""
    return dict(method="fpi", map_sampling="balanced", new_layer_init="zero_out") | kw


@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
def test_fpi_exact_at_integer_ratio_balanced_zero_out(tmp_path, parallel, rotary_pct):
    """x2 width (4 -> 8 heads), FFN 64 -> 96 (any FFN ratio is exact), depth 2 -> 3, TP 1 -> 2."""
    src = classic(parallel_residual=parallel, rotary_pct=rotary_pct)
    dst = wider(src, 8, ffn=96, num_layers=3, tp=2)
    out, rec, sd, dshape, dsd = run_expand(tmp_path, src, dst, **exact_fpi())
    assert rec["exact"] is True and rec["options"]["rms_comp"] == "none", rec["exact_reason"]
    assert dshape.tp == 2 and dshape.norm == "layernorm" and dshape.parallel_residual == parallel
    x = tokens(src)
    assert rel_err(logits(dshape, dsd, x), logits(src, sd, x)) <= TOL
    assert json.loads((out / "expansion.json").read_text())["exact"] is True


@pytest.mark.parametrize("src_tp,dst_tp", [(2, 1), (2, 2)])
def test_fpi_exact_from_tp2_parallel_residual(tmp_path, src_tp, dst_tp):
    """gpt_j_residual at TP 2: every rank adds its share of the row-parallel biases (dense, linear2) before the one
    all-reduce; the expansion works on the logical (summed) biases and re-splits them for the target TP."""
    src = classic(tp=src_tp, pp=0)
    dst = wider(src, 8, ffn=96, tp=dst_tp, pp=1)
    _, rec, sd, dshape, dsd = run_expand(tmp_path, src, dst, **exact_fpi())
    assert rec["exact"] is True and sd["layers.0.attn.o.bias"].abs().sum() > 0
    x = tokens(src)
    assert rel_err(logits(dshape, dsd, x), logits(src, sd, x)) <= TOL


def test_fpi_exact_with_learned_positions_sequential_format(tmp_path):
    """Learned position embeddings widen by columns like the word embedding; pipeline -> sequential, x3 width."""
    src = classic(pos_emb="learned", max_position_embeddings=16, parallel_residual=False)
    dst = wider(src, 12, ffn=64, num_layers=4, pp=0)
    _, rec, sd, dshape, dsd = run_expand(tmp_path, src, dst, **exact_fpi(depth_rule="interp"))
    assert rec["exact"] is True and "pos_embed.weight" in dsd
    gh = torch.from_numpy(load_maps(tmp_path / "out")["hidden"])
    assert torch.equal(dsd["pos_embed.weight"], sd["pos_embed.weight"][:, gh])
    x = tokens(src)
    assert rel_err(logits(dshape, dsd, x), logits(src, sd, x)) <= TOL


@torch.no_grad()
def _block_outputs(shape, sd, x):
    from neox_progressive.model import Transformer

    model = Transformer.from_state_dict(shape, {k: v.clone() for k, v in sd.items()})
    outs = []
    for block in model.layers:
        block.register_forward_hook(lambda mod, args, out: outs.append(out))
    model(x)
    return outs


def test_every_block_output_is_a_copy(tmp_path):
    """x'_k = x_{g_h(k)} after every block (a = 1 for LayerNorm): both sublayers of the parallel residual add copies."""
    src = classic(num_layers=3)
    out, _, sd, dshape, dsd = run_expand(tmp_path, src, wider(src, 8, ffn=80), **exact_fpi())
    gh = torch.from_numpy(load_maps(out)["hidden"])
    x = tokens(src)
    for got, want in zip(_block_outputs(dshape, dsd, x), _block_outputs(src, sd, x), strict=True):
        assert rel_err(got, want[..., gh]) <= TOL


@pytest.mark.parametrize("case", ["non_integer_ratio", "uniform_sampling", "depth_copy"])
def test_fpi_not_exact_elsewhere_and_the_drift_is_there(tmp_path, case):
    """bert2BERT's LayerNorm approximation: the plan says `exact: false` with the reason, and the drift is measured."""
    src = classic()
    heads, opts = {"non_integer_ratio": (5, exact_fpi()), "uniform_sampling": (8, exact_fpi(map_sampling="uniform")),
                   "depth_copy": (8, exact_fpi(new_layer_init="copy"))}[case]
    dst = wider(src, heads, ffn=96, num_layers=3)
    out, rec, sd, dshape, dsd = run_expand(tmp_path, src, dst, **opts)
    c = np.bincount(load_maps(out)["hidden"], minlength=src.hidden_size)
    if case != "depth_copy":
        assert c.min() != c.max()  # the draw really has unequal counts
    assert rec["exact"] is False
    assert ("added layers are copies" if case == "depth_copy" else "LayerNorm") in rec["exact_reason"], rec["exact_reason"]
    x = tokens(src)
    err = rel_err(logits(dshape, dsd, x), logits(src, sd, x))
    print(f"classic FPI {case} ({src.hidden_size} -> {dst.hidden_size}): relative logit error {err:.3g}")
    assert err > 1e-3


def test_rms_comp_exact_is_refused_for_layernorm():
    src = classic()
    with pytest.raises(UserError, match="rms_comp exact: the residual rescaling keeps RMSNorm's mean square, but this "
                                        "model uses LayerNorm"):
        plan_expansion(src, wider(src, 5, ffn=96), ExpandOptions(method="fpi", rms_comp="exact"))
    plan = plan_expansion(src, wider(src, 5, ffn=96), ExpandOptions(method="fpi"))
    assert plan.rms_comp == "none" and (plan.alpha() == 1).all()


def test_plan_lists_the_classic_roles():
    src = classic(pos_emb="learned", max_position_embeddings=16)
    plan = plan_expansion(src, wider(src, 6, ffn=96, num_layers=3), ExpandOptions(method="aki"))
    ops = {op.key: op for op in plan.tensors}
    assert [k for k in ops if not k.startswith("layers.")] == ["embed.weight", "pos_embed.weight", "final_norm.weight",
                                                              "final_norm.bias", "head.weight"]
    want = {"attn_norm.weight": "norm_scale", "attn_norm.bias": "norm_bias", "attn.q.weight": "reads_hidden",
            "attn.q.bias": "unit_bias", "attn.o.weight": "writes_residual", "attn.o.bias": "residual_bias",
            "mlp_norm.bias": "norm_bias", "mlp.up.weight": "reads_hidden", "mlp.up.bias": "unit_bias",
            "mlp.down.weight": "writes_residual", "mlp.down.bias": "residual_bias"}
    for key, rule in want.items():
        assert ops[f"layers.0.{key}"].rule == rule, key
    assert "layers.0.mlp.gate.weight" not in ops and ops["pos_embed.weight"].shape == (16, 48)
    assert ops["layers.0.mlp.up.weight"].sources == ("layers.0.mlp.up.weight", "layers.1.mlp.up.weight")
    assert ops["layers.0.mlp.up.weight"].maps == ("hidden", "layer0.ffn")
    assert ops["layers.2.mlp.up.weight"].sources == ("layers.1.mlp.up.weight",)  # b2b [0, 1, 1]: top layer is FPI
    assert ops["layers.0.mlp.down.bias"].sources == ("layers.0.mlp.down.bias",)  # aki_hidden copy: no upper read
    assert sum(op.bytes for op in plan.tensors) == plan.total_bytes


def _both(tmp_path, src, dst, **kw):
    _, _, sd, dshape, aki = run_expand(tmp_path, src, dst, "aki", method="aki", **kw)
    out, _, _, _, fpi = run_expand(tmp_path, src, dst, "fpi", method="fpi", **kw)
    return sd, dshape, aki, fpi, load_maps(out)


def test_aki_properties(tmp_path):
    """EXPANSION_SPEC 10.5 on the classic layout: old units bit-identical to FPI, new rows (and their biases) from
    IN_h(layer l+1), writers, norms (with their biases), embeddings and the head as FPI, top layer FPI; logits differ
    from the source and are finite."""
    src = classic(num_layers=3)
    dst = wider(src, 6, ffn=96)
    sd, dshape, aki, fpi, m = _both(tmp_path, src, dst)
    gh = torch.from_numpy(m["hidden"])
    for key in aki:
        layer = int(key.split(".")[1]) if key.startswith("layers.") else None
        rows_from_upper = key.endswith(("q.weight", "k.weight", "v.weight", "q.bias", "k.bias", "v.bias", "up.weight",
                                        "up.bias"))
        if layer is None or layer == src.num_layers - 1 or not rows_from_upper:
            assert torch.equal(aki[key], fpi[key]), key
            continue
        units = "ffn" if ".mlp." in key else "heads"
        g = torch.from_numpy(m[f"layer{layer}.{units}"])
        block = 1 if units == "ffn" else src.head_dim
        new = torch.tensor(first_seen(g)).repeat_interleave(block)
        assert new.any() and torch.equal(aki[key][~new], fpi[key][~new]), key
        upper = sd[key.replace(f"layers.{layer}.", f"layers.{layer + 1}.")]
        want = rows_units(upper, g, block)
        want = in_h(want, gh) if want.dim() == 2 else want
        torch.testing.assert_close(aki[key][new], want[new], rtol=1e-6, atol=1e-7, msg=key)
    x = tokens(src)
    out = logits(dshape, aki, x)
    assert torch.isfinite(out).all() and rel_err(out, logits(src, sd, x)) > 1e-3


def test_aki_with_one_layer_is_fpi(tmp_path):
    src = classic(num_layers=1)
    _, _, aki, fpi, _ = _both(tmp_path, src, wider(src, 6, ffn=96))
    assert aki.keys() == fpi.keys() and all(torch.equal(aki[k], fpi[k]) for k in aki)


@pytest.mark.parametrize("option,value", [("aki_second", "upper"), ("aki_hidden", "upper")])
def test_aki_switches_change_only_their_tensors(tmp_path, option, value):
    src = classic()
    dst = wider(src, 6, ffn=96)
    _, _, _, _, base = run_expand(tmp_path, src, dst, "base")
    _, _, _, _, alt = run_expand(tmp_path, src, dst, "alt", **{option: value})
    changed = {k for k in base if not torch.equal(base[k], alt[k])}
    allowed = {"layers.0.attn.o.weight", "layers.0.mlp.down.weight"}
    if option == "aki_hidden":
        allowed |= {"layers.0.attn.o.bias", "layers.0.mlp.down.bias"}
    assert changed and changed <= allowed, changed
    assert {"layers.0.attn.o.weight", "layers.0.mlp.down.weight"} <= changed


def test_dry_run_says_exactness_and_lists_every_tensor(tmp_path, capsys):
    from expand_util import write_source
    from tiny import write_yaml

    from neox_progressive.cli import main

    src = classic()
    src_dir, src_yml, _ = write_source(tmp_path, src)
    argv = ["expand", "--src", str(src_dir), "--src-config", str(src_yml), "--out", str(tmp_path / "o"), "--dry-run",
            "--method", "fpi", "--map-sampling", "balanced"]
    assert main([*argv, "--dst-config", str(write_yaml(tmp_path / "d5.yml", wider(src, 5, ffn=96)))]) == 0
    text = capsys.readouterr().out
    assert "exact: NO: LayerNorm under a hidden map with unequal counts, 32 -> 40 (x1.25)" in text
    assert "layers.T.attn_norm.bias" in text and "norm_bias" in text and "rms_comp=none" in text
    assert main([*argv, "--dst-config", str(write_yaml(tmp_path / "d8.yml", wider(src, 8, ffn=96))), "--format",
                 "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["exact"] is True and plan["options"]["rms_comp"] == "none"
    keys = {t["key"]: t for t in plan["tensors"]}
    assert len(keys) == 4 + 2 * 16 and keys["layers.1.mlp.up.bias"]["rule"] == "unit_bias"
    assert keys["layers.1.mlp.up.bias"]["shape"] == [96] and keys["layers.1.mlp.up.bias"]["bytes"] == 96 * 4
    assert keys["final_norm.bias"] == {"key": "final_norm.bias", "rule": "norm_bias", "sources": ["final_norm.bias"],
                                       "maps": ["hidden"], "shape": [64], "bytes": 256}
    assert not (tmp_path / "o").exists()
