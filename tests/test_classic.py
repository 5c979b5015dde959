"""NeoX's classic transformer through the verbs on CPU: generate-configs, the builtin engine, inspect, run
(independent mode) with its evaluation, export-hf, and one-line refusals of what cannot be represented."""

import json
import math

import pytest
import torch
import yaml
from runner_util import FAST, _merge, prepare_tiny_data
from tiny import random_sd, tiny_shape
from train_util import make_data, stage_config, write_stage

from neox_progressive.cli import main
from neox_progressive.commands.demo import PYTHIA_FAMILY_FILE
from neox_progressive.config import ModelShape
from neox_progressive.errors import UserError
from neox_progressive.family import generate_configs, load_family
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.io.writer import write_checkpoint
from neox_progressive.model import Transformer
from neox_progressive.train import expanded_loss, train_stage
from neox_progressive.train.weights import param_groups

CLASSIC = dict(norm="layernorm", activation="gelu", gelu_approx="tanh", parallel_residual=True, rotary_pct=0.25,
               attn_bias=True, mlp_bias=True)


def pythia_family(path, data, out_dir, **over):
    raw = yaml.safe_load(PYTHIA_FAMILY_FILE.read_text())
    raw = _merge(raw, {"output_dir": str(out_dir), "data": {"train": data["train"], "valid": data["valid"]},
                       "shared": {"vocab_file": data["tokenizer"], "tokenizer_type": "SPMTokenizer"}})
    raw["data"].pop("prepare", None)
    path.write_text(yaml.safe_dump(_merge(raw, over), sort_keys=False))
    return path


def test_weight_decay_groups_leave_out_norms_and_biases():
    shape = tiny_shape(**CLASSIC, pos_emb="learned", max_position_embeddings=16)
    model = Transformer.from_state_dict(shape, random_sd(shape))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = sorted(names[id(p)] for p in no_decay["params"])
    assert skipped == sorted(n for n in names.values() if n.endswith(".bias") or "norm." in n)
    assert any(n.endswith("norm.bias") for n in skipped) and "pos_embed.weight" not in skipped  # NeoX decays embeddings
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("classic"), n_chars=60_000)


@pytest.mark.parametrize("tp,pp,pos", [(1, 0, "rotary"), (2, 1, "learned")])
def test_builtin_engine_trains_a_classic_model(data, tmp_path, tp, pp, pos):
    shape = tiny_shape(**CLASSIC, padded_vocab_size=None, tp=tp, pp=pp, pos_emb=pos, seq_length=32,
                       max_position_embeddings=32)
    cfg = write_stage(tmp_path / "stage.yml", stage_config(data, tmp_path / "ck", shape, train_iters=30))
    res = train_stage(cfg, device="cpu", quiet=True)
    assert abs(res.start_valid_loss - math.log(512)) < 0.1 and res.final_valid_loss < res.start_valid_loss - 0.7
    assert main(["inspect", str(res.save_dir), "--config", str(cfg), "--quiet"]) == 0
    reader = CheckpointReader(res.save_dir, ModelShape.from_yamls([cfg]))
    assert reader.tp == tp and reader.part("final_norm")["final_norm.bias"].abs().sum() > 0
    assert expanded_loss(res.save_dir, cfg, n_batches=2, device="cpu") == pytest.approx(res.final_valid_loss, abs=1e-6)


def test_inspect_shows_the_architecture_and_catches_a_wrong_config(tmp_path, capsys):
    shape = tiny_shape(**CLASSIC, tp=2)
    write_checkpoint(tmp_path / "ck", shape, random_sd(shape))
    assert main(["inspect", str(tmp_path / "ck"), "--format", "json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["architecture"] == {"norm": "layernorm", "mlp": "gelu", "positions": "none stored (rotary)",
                                    "attn_bias": True, "mlp_bias": True}
    assert info["parameters"] == shape.param_count()
    llama = tiny_shape(tp=2)
    (tmp_path / "llama.yml").write_text(yaml.safe_dump(llama.to_neox()))
    assert main(["inspect", str(tmp_path / "ck"), "--config", str(tmp_path / "llama.yml"), "--quiet"]) == 1
    out = capsys.readouterr()
    assert "input_layernorm.scale" in out.out and "problem" in out.err


def test_generated_classic_stages_describe_the_members(tmp_path):
    fam = load_family(PYTHIA_FAMILY_FILE)
    generate_configs(fam, tmp_path, "independent", plot=False)
    for m in fam.members:
        stage = tmp_path / f"stage_{m.name}.yml"
        cfg = yaml.safe_load(stage.read_text())
        assert (cfg["norm"], cfg["activation"], cfg["bias_gelu_fusion"], cfg["gpt_j_residual"]) == (
            "layernorm", "gelu", True, True)
        assert "rms_norm_epsilon" not in cfg and cfg["layernorm_epsilon"] == 1e-5
        assert cfg["intermediate_size"] == m.ffn_size == 4 * m.hidden_size
        want, got = m.shape(), ModelShape.from_yamls([stage])
        assert got.replace(vocab_size=want.vocab_size, padded_vocab_size=want.padded_vocab_size) == want


@pytest.mark.slow
def test_run_trains_and_evaluates_a_classic_family_independently(tmp_path, capsys):
    """Every member from scratch with the builtin engine, then perplexity, KL and speculative decoding."""
    data = prepare_tiny_data(tmp_path / "data")
    fam = pythia_family(tmp_path / "family.yml", data, tmp_path / "out", **FAST)
    assert main(["run", str(fam), "--mode", "independent", "--engine", "builtin", "--device", "cpu", "--quiet"]) == 0
    report = json.loads((tmp_path / "out" / "report" / "report.json").read_text())
    text = json.dumps(report)
    assert "independent/s" in text and "independent/l" in text and "kl" in text.lower()


@pytest.mark.parametrize("changes,needle", [
    ({"model": {"gelu_approx": "tanh", "activation": "swiglu"}}, "gelu_approx: is only used with activation: gelu"),
    ({"model": {"norm": "layrnorm"}}, "did you mean 'layernorm'"),
    ({"model": {"mlp_bias": False}}, "gpt_j_residual: true with use_bias_in_mlp: false"),
    ({"model": {"rms_norm_eps": 1.0e-6}}, "rms_norm_eps: is only used with norm: rmsnorm"),
])
def test_family_file_refuses_architecture_mistakes(tmp_path, changes, needle):
    fam = pythia_family(tmp_path / "f.yml", {"train": "t", "valid": "v", "tokenizer": "tok.model"}, tmp_path / "o",
                        **changes)
    with pytest.raises(UserError, match=needle) as info:
        load_family(fam)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("key,value", [("no_weight_tying", False), ("moe_num_experts", 4), ("gpt_j_tied", True),
                                       ("use_mup", True), ("use_qk_layernorm", True)])
def test_cli_refuses_unrepresentable_configs_and_writes_nothing(tmp_path, capsys, key, value):
    shape = tiny_shape(**CLASSIC)
    write_checkpoint(tmp_path / "ck", shape, random_sd(shape))
    (tmp_path / "c.yml").write_text(yaml.safe_dump(shape.to_neox() | {key: value}))
    for verb in (["export-hf", str(tmp_path / "ck"), "--config", str(tmp_path / "c.yml"), "--out", str(tmp_path / "hf")],
                 ["inspect", str(tmp_path / "ck"), "--config", str(tmp_path / "c.yml")]):
        assert main(verb) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"config key {key}: {value!r}" in err[0]
    assert not (tmp_path / "hf").exists()


def test_export_hf_cli_refuses_learned_positions_before_writing(tmp_path, capsys):
    shape = tiny_shape(**CLASSIC, pos_emb="learned", max_position_embeddings=16)
    write_checkpoint(tmp_path / "ck", shape, random_sd(shape))
    (tmp_path / "c.yml").write_text(yaml.safe_dump(shape.to_neox()))
    assert main(["export-hf", str(tmp_path / "ck"), "--config", str(tmp_path / "c.yml"), "--out", str(tmp_path / "hf")]) != 0
    assert "learned position embeddings" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_learned_positions_beyond_the_table_are_an_error():
    shape = tiny_shape(**CLASSIC, pos_emb="learned", max_position_embeddings=8)
    model = Transformer.from_state_dict(shape, random_sd(shape))
    model(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="beyond the learned position table"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("kw", [{}, dict(attn_bias=True, mlp_bias=True, num_kv_heads=2), CLASSIC,
                                {**CLASSIC, "pos_emb": "learned", "max_position_embeddings": 16},
                                {**CLASSIC, "attn_bias": False, "parallel_residual": False, "mlp_bias": False}])
def test_logical_keys_are_the_reference_models_parameters(kw):
    from neox_progressive import arch

    shape = tiny_shape(**kw)
    with torch.device("meta"):
        model = Transformer(shape)
    params = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = {**{f"layers.{i}.{k}": s for i in range(shape.num_layers) for k, s in arch.logical_layer_shapes(shape).items()},
              **arch.logical_global_shapes(shape)}
    assert params == shapes and sorted(arch.logical_keys(shape)) == sorted(params)
