"""The reference model and the HF export against transformers' LlamaForCausalLM (independent code)."""

import json

import pytest
import torch
from tiny import random_sd, tiny_shape

from neox_progressive import arch
from neox_progressive.errors import UserError
from neox_progressive.hf import export_hf, logical_from_hf
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.io.writer import write_checkpoint
from neox_progressive.model import Transformer

transformers = pytest.importorskip("transformers")

CASES = {  # name: (num_kv_heads, biases, tp, pp)
    "mha": (4, False, 1, 1),
    "gqa": (2, False, 1, 1),
    "mqa-bias-tp2-seq": (2, True, 2, 0),
    "mha-tp2": (4, False, 2, 1),
}


def shape_for(case):
    kv, bias, tp, pp = CASES[case]
    return tiny_shape(num_kv_heads=kv, attn_bias=bias, tp=tp, pp=pp, rotary_emb_base=5000, rms_norm_eps=1e-6)


def hf_model(shape, seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=shape.padded_vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.ffn_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, rms_norm_eps=shape.rms_norm_eps, rope_theta=float(shape.rotary_emb_base),
        max_position_embeddings=shape.max_position_embeddings, attention_bias=shape.attn_bias,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.3) if "norm" not in name else p.uniform_(0.5, 1.5)
    return model


def tokens(shape, n=2, t=11, seed=0):
    return torch.randint(0, shape.padded_vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_reference_model_equals_llama_through_neox_files(tmp_path, case):
    shape = shape_for(case)
    hf = hf_model(shape)
    x = tokens(shape)
    with torch.no_grad():
        want = hf(x).logits
    write_checkpoint(tmp_path / "ck", shape, logical_from_hf(hf.state_dict()))
    reader = CheckpointReader(tmp_path / "ck", shape)
    got = Transformer.from_state_dict(reader.shape, reader.state_dict())(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.std() > 0.5  # logits far from zero: a layout mistake could not hide


@pytest.mark.parametrize("case", list(CASES))
def test_export_hf_loads_in_transformers_with_the_same_logits(tmp_path, case):
    shape = shape_for(case)
    sd = random_sd(shape)
    write_checkpoint(tmp_path / "ck", shape, sd)
    reader = CheckpointReader(tmp_path / "ck", shape)
    export_hf(reader, tmp_path / "hf", max_shard_bytes=20_000)  # forces several shards
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["intermediate_size"] == shape.ffn_size and cfg["num_key_value_heads"] == shape.num_kv_heads
    assert cfg["rope_theta"] == 5000 and cfg["rms_norm_eps"] == 1e-6
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    x = tokens(shape, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, Transformer.from_state_dict(reader.shape, sd)(x), rtol=1e-5, atol=1e-5)


def test_misreading_the_mha_layout_changes_the_logits(tmp_path):
    """The negative control for the tests above: NeoX's own converter splits MHA QKV as blocked."""
    shape = shape_for("mha")
    sd = random_sd(shape)
    write_checkpoint(tmp_path / "ck", shape, sd)
    reader = CheckpointReader(tmp_path / "ck", shape)
    good = reader.layer(0)
    fused = reader.file_state(arch.layer_index(0))[0][arch.QKV_WEIGHT]
    q, k, v = fused.split(shape.hidden_size)  # the blocked reading
    assert not torch.equal(q, good["attn.q.weight"])
    x = tokens(shape)
    wrong = dict(sd, **{"layers.0.attn.q.weight": q, "layers.0.attn.k.weight": k, "layers.0.attn.v.weight": v})
    diff = (Transformer.from_state_dict(shape, wrong)(x) - Transformer.from_state_dict(shape, sd)(x)).abs().max()
    assert diff > 0.1


def test_partial_rotary_is_refused(tmp_path):
    shape = tiny_shape(rotary_pct=0.5)
    write_checkpoint(tmp_path / "ck", shape, random_sd(shape))
    with pytest.raises(UserError, match="rotary_pct"):
        export_hf(CheckpointReader(tmp_path / "ck", shape), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_partial_rotary_reference_model_rotates_only_the_first_dims():
    """rotary_pct=0.5: the second half of every head is position independent (NeoX's split)."""
    shape = tiny_shape(rotary_pct=0.5, num_layers=1)
    model = Transformer.from_state_dict(shape, random_sd(shape))
    x = torch.randn(1, 1, 3, 8)
    rot = model.layers[0].attn.rotary
    out = rot(x, torch.tensor([5, 6, 7]))
    assert torch.equal(out[..., 4:], x[..., 4:]) and not torch.allclose(out[..., :4], x[..., :4])
