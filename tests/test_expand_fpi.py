"""FPI is function preserving (EXPANSION_SPEC section 10 items 1, 2, 3, 6, 9): the expanded model's logits,
computed by the reference model on the read-back checkpoint, equal the *source* model's."""

import numpy as np
import pytest
import torch
from expand_util import logits, rel_err, run_expand, shape, tokens, wider

from neox_progressive.expand import load_maps

TOL = 1e-5


@pytest.mark.parametrize("kv,dst_heads,dst_kv,bias", [
    (4, 5, 5, False),   # MHA
    (4, 6, 6, True),    # MHA, biases
    (2, 6, 3, False),   # fixed group size G = 2
    (2, 6, 2, True),    # fixed KV heads, G 2 -> 3
    (1, 5, 1, False),   # MQA kept
])
def test_fpi_width_exact(tmp_path, kv, dst_heads, dst_kv, bias):
    src = shape(num_kv_heads=kv, attn_bias=bias, mlp_bias=bias)
    dst = wider(src, dst_heads, dst_kv, ffn=60)
    out, rec, sd, dshape, dsd = run_expand(tmp_path, src, dst, method="fpi")
    assert rec["options"]["rms_comp"] == "exact"
    x = tokens(src)
    want = logits(src, sd, x)
    assert rel_err(logits(dshape, dsd, x), want) <= TOL
    # the GQA constraint: every target query head's KV head copies its source head's KV head
    m = load_maps(out)
    g_h, g_kv = m["layer0.heads"], m["layer0.kv_heads"]
    G, G2 = src.num_heads // kv, dst_heads // dst_kv
    assert all(g_kv[j // G2] == g_h[j] // G for j in range(dst_heads))


@pytest.mark.parametrize("src_tp,dst_tp,src_pp,dst_pp", [(1, 2, 1, 1), (2, 1, 1, 1), (1, 1, 1, 0), (2, 2, 0, 1), (1, 2, 0, 0)])
def test_fpi_exact_across_tp_and_formats(tmp_path, src_tp, dst_tp, src_pp, dst_pp):
    src = shape(num_kv_heads=2, tp=src_tp, pp=src_pp)
    dst = wider(src, 6, 2, ffn=64, tp=dst_tp, pp=dst_pp)
    out, rec, sd, dshape, dsd = run_expand(tmp_path, src, dst, method="fpi")
    assert dshape.tp == dst_tp and ((out / "global_step0" / "layer_02-model_00-model_states.pt").exists() == (dst_pp > 0))
    x = tokens(src)
    assert rel_err(logits(dshape, dsd, x), logits(src, sd, x)) <= TOL


def test_fpi_fp64_source_stays_fp64(tmp_path):
    src = shape(num_layers=3)
    from tiny import random_sd
    sd = random_sd(src, dtype=torch.float64)
    out, rec, sd, dshape, dsd = run_expand(tmp_path, src, wider(src, 5, ffn=61), sd=sd, method="fpi")
    assert dsd["layers.0.attn.q.weight"].dtype == torch.float64
    x = tokens(src)
    # the reference model computes RMSNorm in fp32 (as NeoX does), which bounds the agreement
    assert rel_err(logits(dshape, dsd, x), logits(src, sd, x)) <= 2e-6


@pytest.mark.parametrize("rule,layers", [("b2b", 3), ("b2b", 5), ("interp", 5), ("cyclic", 4)])
def test_fpi_depth_zero_out_exact_and_copy_not(tmp_path, rule, layers):
    src = shape(num_layers=2)
    dst = wider(src, 5, ffn=60, num_layers=layers)
    x = tokens(src)
    _, _, sd, dshape, dsd = run_expand(tmp_path, src, dst, "zero", method="fpi", depth_rule=rule, new_layer_init="zero_out")
    want = logits(src, sd, x)
    assert rel_err(logits(dshape, dsd, x), want) <= TOL
    _, _, _, cshape, csd = run_expand(tmp_path, src, dst, "copy", method="fpi", depth_rule=rule)
    err = rel_err(logits(cshape, csd, x), want)
    print(f"plain {rule} stacking {src.num_layers}->{layers}: relative logit error {err:.3g}")
    assert err > 1e-3


def test_rms_comp_none_at_non_integer_ratio_is_not_exact(tmp_path):
    src = shape()
    dst = wider(src, 5, ffn=60)  # 32 -> 40: ratio 1.25
    _, _, sd, dshape, dsd = run_expand(tmp_path, src, dst, method="fpi", rms_comp="none")
    x = tokens(src)
    err = rel_err(logits(dshape, dsd, x), logits(src, sd, x))
    print(f"fpi rms_comp=none 32->40: relative logit error {err:.3g}")
    assert err > 1e-4


def test_balanced_integer_ratio_exact_without_compensation(tmp_path):
    src = shape()
    dst = wider(src, 8, ffn=96)  # x2, balanced: every count is 2
    _, _, sd, dshape, dsd = run_expand(tmp_path, src, dst, method="fpi", rms_comp="none", map_sampling="balanced")
    x = tokens(src)
    assert rel_err(logits(dshape, dsd, x), logits(src, sd, x)) <= TOL


def test_fold_back_invariants(tmp_path):
    """Sum over copies of IN_h columns / head column blocks / FFN columns gives back the source (spec 10.3)."""
    src = shape(num_kv_heads=2)
    dst = wider(src, 6, 3, ffn=60)
    out, rec, sd, dshape, dsd = run_expand(tmp_path, src, dst, method="fpi")
    m = load_maps(out)
    gh, gH, gf = m["hidden"], m["layer1.heads"], m["layer1.ffn"]
    c = np.bincount(gh, minlength=src.hidden_size)
    a = np.sqrt((dst.hidden_size / src.hidden_size) / c[gh])
    d = src.head_dim
    q, o, down = dsd["layers.1.attn.q.weight"], dsd["layers.1.attn.o.weight"], dsd["layers.1.mlp.down.weight"]
    folded = torch.zeros(q.shape[0], src.hidden_size).index_add_(1, torch.from_numpy(gh), q)
    want_q = sd["layers.1.attn.q.weight"].reshape(4, d, -1)[torch.from_numpy(gH)].reshape(-1, src.hidden_size)
    torch.testing.assert_close(folded, want_q)
    first = np.unique(gh, return_index=True)[1]                     # first occurrence of each source unit
    o_rows = o[first] / torch.from_numpy(a[first]).float()[:, None]  # undo the residual scale
    o_fold = torch.zeros(src.hidden_size, 4, d).index_add_(1, torch.from_numpy(gH), o_rows.reshape(src.hidden_size, 6, d))
    torch.testing.assert_close(o_fold.reshape(src.hidden_size, -1), sd["layers.1.attn.o.weight"])
    d_rows = down[first] / torch.from_numpy(a[first]).float()[:, None]
    d_fold = torch.zeros(src.hidden_size, src.ffn_size).index_add_(1, torch.from_numpy(gf), d_rows)
    torch.testing.assert_close(d_fold, sd["layers.1.mlp.down.weight"])
    torch.testing.assert_close(dsd["layers.1.mlp.gate.weight"][:, first] * torch.from_numpy(c.astype(np.float32)),
                               sd["layers.1.mlp.gate.weight"][torch.from_numpy(gf)])


def test_vocab_repadded_for_the_target_tp(tmp_path):
    """96 rows pad to 128 at TP 2 (make_vocab_size_divisible_by 32): the new rows are zero, the old logits exact."""
    src = shape(padded_vocab_size=96)
    dst = wider(src, 6, ffn=64, tp=2)
    _, rec, sd, dshape, dsd = run_expand(tmp_path, src, dst, method="fpi")
    assert dshape.padded_vocab_size == 128 == rec["target"]["padded_vocab_size"]
    assert not dsd["embed.weight"][96:].any() and not dsd["head.weight"][96:].any()
    x = tokens(src)
    assert rel_err(logits(dshape, dsd, x)[..., :96], logits(src, sd, x)) <= TOL


@torch.no_grad()
def _block_outputs(shape, sd, x):
    from neox_progressive.model import Transformer

    model = Transformer.from_state_dict(shape, {k: v.clone() for k, v in sd.items()})
    outs = []
    for block in model.layers:
        block.register_forward_hook(lambda mod, args, out: outs.append(out))
    model(x)
    return outs


def test_every_block_output_is_a_scaled_copy(tmp_path):
    """x'_k = a_k x_{g_h(k)} after every block (EXPANSION_SPEC section 10 item 1), a_k = sqrt((h'/h)/c(g_h(k)))."""
    src = shape(num_layers=3, num_kv_heads=2)
    out, _, sd, dshape, dsd = run_expand(tmp_path, src, wider(src, 6, 2, ffn=60), method="fpi")
    gh = load_maps(out)["hidden"]
    a = torch.from_numpy(np.sqrt((48 / 32) / np.bincount(gh, minlength=32)[gh])).float()
    x = tokens(src)
    for got, want in zip(_block_outputs(dshape, dsd, x), _block_outputs(src, sd, x), strict=True):
        assert rel_err(got, want[..., torch.from_numpy(gh)] * a) <= TOL
