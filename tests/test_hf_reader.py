"""HFReader against transformers: the reference model on HFReader.state_dict() gives transformers' logits for
every supported architecture (saved with save_pretrained), lazily per layer; bad directories are refused."""

import json

import pytest
import torch
from hf_import_util import MODELS, build, hf_logits, ours, rel_err, save, tokens

from neox_progressive import arch
from neox_progressive.errors import UserError
from neox_progressive.io.hf_reader import HFReader, divisible_by_for, shape_from_hf_config

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("name", list(MODELS))
def test_reader_gives_transformers_logits(tmp_path, name):
    model = build(name)
    reader = HFReader(save(model, tmp_path / name))
    x = tokens()
    want = hf_logits(model, x)
    got = ours(reader.shape, reader.state_dict(), x)
    assert want.std() > 0.5  # far from zero: a layout mistake cannot hide
    assert rel_err(got, want) <= 1e-5
    assert list(reader.state_dict()) == arch.logical_keys(reader.shape)


def test_sharded_safetensors_and_layer_by_layer(tmp_path):
    model = build("llama-gqa")
    path = save(model, tmp_path / "m", max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    reader = HFReader(path)
    hf = model.state_dict()
    layer = reader.layer(1)
    assert torch.equal(layer["attn.k.weight"], hf["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(layer["mlp.gate.weight"], hf["model.layers.1.mlp.gate_proj.weight"])
    assert [i for i, _ in reader.iter_layers()] == [0, 1]


def test_pytorch_bin_through_the_safe_loader(tmp_path):
    model = build("llama-mha")
    path = tmp_path / "bin"
    path.mkdir()
    model.config.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")
    reader = HFReader(path)
    x = tokens()
    assert rel_err(ours(reader.shape, reader.state_dict(), x), hf_logits(model, x)) <= 1e-5


def test_sharded_pytorch_bin_with_its_index(tmp_path):
    model = build("gpt-neox")
    path = tmp_path / "bins"
    path.mkdir()
    model.config.save_pretrained(path)
    sd = model.state_dict()
    names = {k: f"pytorch_model-0000{1 + ('layers.1.' in k)}-of-00002.bin" for k in sd}
    for name in set(names.values()):
        torch.save({k: v for k, v in sd.items() if names[k] == name}, path / name)
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": names}))
    reader = HFReader(path)
    x = tokens()
    assert rel_err(ours(reader.shape, reader.state_dict(), x), hf_logits(model, x)) <= 1e-5


def test_tied_head_is_a_copy_and_said(tmp_path):
    reader = HFReader(save(build("llama-tied"), tmp_path / "t"))
    assert reader.tied and any("copy of the embedding" in n for n in reader.notes)
    assert torch.equal(reader.head(), reader.embed())


def test_qwen2_output_bias_is_zero_and_said(tmp_path):
    reader = HFReader(save(build("qwen2"), tmp_path / "q"))
    assert reader.shape.attn_bias and torch.count_nonzero(reader.layer(0)["attn.o.bias"]) == 0
    assert torch.count_nonzero(reader.layer(0)["attn.q.bias"]) > 0
    assert any("zeros" in n for n in reader.notes)


def test_bf16_weights_stay_bf16(tmp_path):
    model = build("llama-gqa").to(torch.bfloat16)
    reader = HFReader(save(model, tmp_path / "b"))
    assert reader.layer(0)["attn.q.weight"].dtype == torch.bfloat16 and reader.shape.params_dtype == "bfloat16"


def test_vocab_padding_choice():
    assert divisible_by_for(96, 1) == 32 and divisible_by_for(128256, 1) == 128 and divisible_by_for(151936, 2) == 64
    assert divisible_by_for(96, 2, tokenizer_size=70) == 16  # 70 -> 96 at TP 2 with 16 (32 would pad to 128)
    assert divisible_by_for(50, 1) == 2
    assert divisible_by_for(151936, 1, tokenizer_size=151665) == 151936  # Qwen2: no power of two pads 151665 there
    assert divisible_by_for(384, 1, tokenizer_size=300) == 128 and divisible_by_for(384, 1, tokenizer_size=250) == 384


def _cfg(name, **over):
    cfg = build(name).config.to_dict()
    cfg["architectures"] = [type(build(name)).__name__]
    cfg.update(over)
    return cfg


@pytest.mark.parametrize("over,key", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}, "rope_parameters": None}, "rope_scaling.rope_type"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_parameters.rope_type"),
    ({"architectures": ["MixtralForCausalLM"], "num_local_experts": 8}, "architectures"),
    ({"num_local_experts": 8}, "num_local_experts"),
    ({"architectures": ["FalconForCausalLM"]}, "architectures"),
    ({"head_dim": 16}, "head_dim"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unrepresentable_configs_are_refused_naming_the_key(over, key):
    with pytest.raises(UserError) as err:
        shape_from_hf_config(_cfg("llama-gqa", **over))
    assert f"{key} = " in str(err.value) and "\n" not in str(err.value)


def test_mistral_sliding_window_refused_unless_it_covers_every_position():
    with pytest.raises(UserError, match="sliding_window = 16"):
        shape_from_hf_config(_cfg("mistral", sliding_window=16))
    assert shape_from_hf_config(_cfg("mistral", sliding_window=64)).num_kv_heads == 2
    with pytest.raises(UserError, match="layer_types"):
        shape_from_hf_config(_cfg("qwen2", layer_types=["sliding_attention", "full_attention"]))


def test_missing_shard_missing_key_and_wrong_shape_are_refused(tmp_path):
    path = save(build("llama-gqa"), tmp_path / "m", max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (path / shard).rename(tmp_path / "aside")
    with pytest.raises(UserError, match=f"names {shard}, which does not exist"):
        HFReader(path)
    (tmp_path / "aside").rename(path / shard)

    from safetensors.torch import load_file, save_file

    key = "model.layers.0.self_attn.k_proj.weight"
    where = path / index["weight_map"][key]
    tensors = load_file(str(where))
    save_file({**tensors, key: tensors[key][:8]}, str(where), metadata={"format": "pt"})
    with pytest.raises(UserError, match=r"k_proj.weight has shape \(8, 32\) but config.json implies \(16, 32\)"):
        HFReader(path)  # from the header, before any data is read
    save_file({k: v for k, v in tensors.items() if k != key}, str(where), metadata={"format": "pt"})
    with pytest.raises(UserError, match="index puts 'model.layers.0.self_attn.k_proj.weight' in this file"):
        HFReader(path)
    del index["weight_map"][key]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match="k_proj.weight' is missing"):
        HFReader(path)


def test_nonfinite_weights_are_refused(tmp_path):
    model = build("llama-mha")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    path = save(model, tmp_path / "n")
    with pytest.raises(UserError, match="up_proj.weight has 1 non-finite"):
        HFReader(path).layer(1)
    assert torch.isnan(HFReader(path, allow_nonfinite=True).layer(1)["mlp.up.weight"]).any()


def test_no_weights_or_no_config(tmp_path):
    with pytest.raises(UserError, match="config.json does not exist"):
        HFReader(tmp_path)
    build("llama-mha").config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="has no model.safetensors"):
        HFReader(tmp_path)
