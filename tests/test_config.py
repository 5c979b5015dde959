"""Reading model shapes from NeoX YAML files the way NeoX does."""

import json

import pytest
import yaml

from neox_progressive.config import ModelShape, merge_neox_configs, neox_intermediate_size, swiglu_widths
from neox_progressive.errors import UserError

LLAMA = {
    "num_layers": 18, "hidden_size": 2048, "num_attention_heads": 16, "intermediate_size": 21504,
    "mlp_multiple_of": 256, "seq_length": 1024, "max_position_embeddings": 1024, "pos_emb": "rotary",
    "norm": "rmsnorm", "activation": "swiglu", "no_weight_tying": True, "use_bias_in_attn_linear": False,
    "use_bias_in_mlp": False, "make_vocab_size_divisible_by": 128,
}

# configs/pythia/410M.yml (architecture keys), with a 4h FFN from NeoX's default
CLASSIC = {
    "num_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "seq_length": 2048,
    "max_position_embeddings": 2048, "pos_emb": "rotary", "rotary_pct": 0.25, "no_weight_tying": True,
    "gpt_j_residual": True, "output_layer_parallelism": "column", "norm": "layernorm", "layernorm_epsilon": 1.0e-5,
    "activation": "gelu", "bias_gelu_fusion": True, "make_vocab_size_divisible_by": 128,
}


def dump(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_merge_converts_dashes_and_refuses_repeated_keys(tmp_path):
    a = dump(tmp_path / "a.yml", {"num-layers": 2, "hidden_size": 32})
    b = dump(tmp_path / "b.yml", {"num_attention_heads": 4})
    merged = merge_neox_configs([a, b])
    assert merged == {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4}
    c = dump(tmp_path / "c.yml", {"num_layers": 3})
    with pytest.raises(UserError, match="num_layers.*a.yml.*c.yml"):
        merge_neox_configs([a, c])
    d = dump(tmp_path / "d.yml", {"num_layers": 3})  # dash and underscore spellings are the same key
    with pytest.raises(UserError, match="num_layers"):
        merge_neox_configs([a, d])


def test_duplicate_key_inside_one_file_is_an_error(tmp_path):
    p = tmp_path / "dup.yml"
    p.write_text("hidden_size: 32\nhidden_size: 64\n")
    with pytest.raises(UserError, match="twice"):
        merge_neox_configs([p])


@pytest.mark.parametrize("ffn,multiple", [(7168, 256), (8960, 256), (11200, 64), (14336, 256), (11008, 256)])
def test_intermediate_size_reproduces_the_ffn_width(ffn, multiple):
    value = neox_intermediate_size(ffn, multiple)
    assert value == 3 * ffn
    # NeoX: linear1 rows = roundup(int(2I/3), 2m); linear2 cols = roundup(int(2I/3)//2, m)
    rows = int(value * 2 / 3)
    cols = rows // 2
    rows = -(-rows // (2 * multiple)) * 2 * multiple
    cols = -(-cols // multiple) * multiple
    assert (rows, cols) == (2 * ffn, ffn) == swiglu_widths(value, multiple)


def test_ffn_width_rounded_away_by_multiple_of_is_refused():
    # 11200 with the default-ish 256 would become 11264 in NeoX (EXPANSION_SPEC section 7)
    assert swiglu_widths(33600, 256)[1] == 11264
    with pytest.raises(UserError, match="mlp_multiple_of.*11264.*64"):
        neox_intermediate_size(11200, 256)


def test_llama2_7b_config_value():
    # configs/llama2/7B.yml: intermediate_size 32768 with mlp_multiple_of 256 -> 11008 (NEOX_FACTS 2)
    assert swiglu_widths(32768, 256) == (22016, 11008)


def test_shape_from_neox_defaults_and_derived_values(tmp_path):
    shape = ModelShape.from_yamls([dump(tmp_path / "m.yml", LLAMA)])
    assert shape.ffn_size == 7168 and shape.intermediate_size == 21504
    assert shape.num_kv_heads == 16 and not shape.gqa
    assert shape.head_dim == 128
    assert shape.rms_norm_eps == 1e-8  # NeoX's default, not HF's
    assert shape.rotary_emb_base == 10000 and shape.rotary_pct == 1.0
    assert shape.padded_vocab_size is None  # no tokenizer file here: comes from the checkpoint
    assert shape.pp == 0 and shape.tp == 1  # NeoX defaults: sequential format
    gqa = ModelShape.from_yamls([dump(tmp_path / "g.yml", {**LLAMA, "num_kv_heads": 4})])
    assert gqa.gqa and gqa.num_kv_heads == 4


def test_padded_vocab_from_tokenizer_files(tmp_path):
    vocab = {f"t{i}": i for i in range(50257)}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    cfg = {**LLAMA, "tokenizer_type": "GPT2BPETokenizer", "vocab_file": "vocab.json", "model_parallel_size": 2}
    shape = ModelShape.from_yamls([dump(tmp_path / "m.yml", cfg)])
    assert shape.vocab_size == 50257
    assert shape.padded_vocab_size == 50432  # next multiple of 128 x TP 2 = 256
    hf = {"model": {"type": "BPE", "vocab": {f"x{i}": i for i in range(300)}},
          "added_tokens": [{"id": 300, "content": "<eod>"}, {"id": 5, "content": "x5"}]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(hf))
    cfg = {**LLAMA, "tokenizer_type": "HFTokenizer", "vocab_file": str(tmp_path / "tokenizer.json"),
           "make_vocab_size_divisible_by": 1}
    shape = ModelShape.from_yamls([dump(tmp_path / "h.yml", cfg)])
    assert (shape.vocab_size, shape.padded_vocab_size) == (301, 301)


def test_missing_tokenizer_file_falls_back_to_checkpoint(tmp_path):
    cfg = {**LLAMA, "tokenizer_type": "HFTokenizer", "vocab_file": "/nonexistent/tokenizer.json"}
    shape = ModelShape.from_yamls([dump(tmp_path / "m.yml", cfg)])
    assert shape.padded_vocab_size is None
    assert shape.with_vocab(50304).padded_vocab_size == 50304


@pytest.mark.parametrize("key,value", [
    ("norm", "scalenorm"), ("norm", "non_parametric_layernorm"), ("activation", "relu"), ("activation", "geglu"),
    ("pos_emb", "alibi"), ("pos_emb", "rpe"), ("pos_emb", "sinusoidal"), ("no_weight_tying", False),
    ("gpt_j_tied", True), ("moe_num_experts", 8), ("use_mup", True), ("use_qk_layernorm", True),
    ("soft_prompt_tuning", {"enabled": True}), ("sliding_window_width", 512), ("te_layernorm_mlp", True),
    ("opt_pos_emb_offset", 2),
])
def test_models_we_cannot_represent_are_refused_with_the_key_and_value(tmp_path, key, value):
    for base in (LLAMA, CLASSIC):
        with pytest.raises(UserError, match=f"config key {key}: {value!r}") as info:
            ModelShape.from_yamls([dump(tmp_path / "m.yml", {**base, key: value})])
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("changes,needle", [
    ({"attention_config": [[["sparse_fixed"], 18]]}, "attention_config: layer type 'sparse_fixed'"),
    ({"use_bias_in_mlp": False}, "gpt_j_residual: true with use_bias_in_mlp: false"),
    ({"onnx_safe": True}, "onnx_safe: true and bias_gelu_fusion: true"),
    ({"intermediate_size": 8193}, "linear1 with 8194 rows but linear2 with 8193 columns"),
])
def test_classic_configs_neox_cannot_run_are_refused(tmp_path, changes, needle):
    with pytest.raises(UserError, match=needle) as info:
        ModelShape.from_yamls([dump(tmp_path / "m.yml", {**CLASSIC, **changes})])
    assert "\n" not in str(info.value)


def test_classic_shape_from_a_pythia_config(tmp_path):
    # configs/pythia/410M.yml's architecture keys; NeoX defaults fill in the rest (4h FFN, learned -> rotary here)
    shape = ModelShape.from_yamls([dump(tmp_path / "p.yml", CLASSIC)])
    assert (shape.norm, shape.activation, shape.gelu_approx) == ("layernorm", "gelu", "tanh")
    assert shape.parallel_residual and shape.pos_emb == "rotary" and shape.rotary_dims == 16
    assert shape.ffn_size == 4 * 1024 and shape.intermediate_size == 4096
    assert shape.norm_eps == shape.layernorm_eps == 1e-5 and shape.architecture == "neox"
    assert shape.attn_bias and shape.mlp_bias  # NeoX's defaults
    erf = ModelShape.from_yamls([dump(tmp_path / "e.yml", {**CLASSIC, "bias_gelu_fusion": False, "onnx_safe": True})])
    assert erf.gelu_approx == "erf"
    # NeoX's own defaults: layernorm, gelu, learned positions, sequential residual
    bare = {k: CLASSIC[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                                    "max_position_embeddings", "no_weight_tying")}
    learned = ModelShape.from_yamls([dump(tmp_path / "l.yml", bare)])
    assert (learned.pos_emb, learned.norm, learned.activation, learned.gelu_approx) == ("learned", "layernorm", "gelu", "erf")
    assert not learned.parallel_residual


@pytest.mark.parametrize("arch", ["llama", "classic", "learned", "sequential_residual"])
def test_to_neox_reads_back_as_the_same_shape(tmp_path, arch):
    base = {"llama": LLAMA, "classic": CLASSIC, "learned": {**CLASSIC, "pos_emb": "learned"},
            "sequential_residual": {**CLASSIC, "gpt_j_residual": False, "layernorm_epsilon": 1.0e-6}}[arch]
    shape = ModelShape.from_yamls([dump(tmp_path / "a.yml", base)])
    again = ModelShape.from_yamls([dump(tmp_path / "b.yml", shape.to_neox())])
    assert again == shape


@pytest.mark.parametrize("changes,needle", [
    ({"hidden_size": 2050}, "not divisible by num_attention_heads"),
    ({"num_kv_heads": 5}, "num_kv_heads"),
    ({"model_parallel_size": 3}, "model_parallel_size 3"),
    ({"intermediate_size": 21506, "mlp_multiple_of": 1}, "linear1"),
])
def test_bad_shapes_give_one_line_errors(tmp_path, changes, needle):
    with pytest.raises(UserError, match=needle) as info:
        ModelShape.from_yamls([dump(tmp_path / "m.yml", {**LLAMA, **changes})])
    assert "\n" not in str(info.value)


def test_missing_config_file():
    with pytest.raises(UserError, match="does not exist"):
        ModelShape.from_yamls(["/nonexistent.yml"])


def test_param_count_matches_the_reference_model():
    import torch

    from neox_progressive.model import Transformer

    classic = dict(norm="layernorm", activation="gelu", parallel_residual=True, attn_bias=True, mlp_bias=True)
    for kw in ({}, {"num_kv_heads": 4, "attn_bias": True, "mlp_bias": True}, classic, {**classic, "pos_emb": "learned"}):
        shape = ModelShape(hidden_size=2048, num_layers=18, num_heads=16, ffn_size=7168, padded_vocab_size=50304,
                           num_kv_heads=kw.pop("num_kv_heads", 16), **kw)
        with torch.device("meta"):
            model = Transformer(shape)
        assert shape.param_count() == sum(p.numel() for p in model.parameters())
