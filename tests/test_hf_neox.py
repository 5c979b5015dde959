"""NeoX's classic transformer (Pythia-style) against transformers' GPTNeoXForCausalLM (independent code).

The HF model is built in-process from a config (no downloads), its weights are drawn at random, mapped
to logical tensors, written as NeoX files (pipeline or sequential, TP 1 or 2) and read back; our
reference model must give HF's logits. The export goes the other way and must load in transformers
5.x here and in transformers 4.38 (NeoX's pinned version) where NeoX's virtualenv exists.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_shape

from neox_progressive.errors import UserError
from neox_progressive.hf import export_hf, logical_from_hf
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.io.writer import write_checkpoint
from neox_progressive.model import Transformer

transformers = pytest.importorskip("transformers")

CASES = {  # name: (gpt_j_residual, rotary_pct, gelu, attn/mlp biases, tp, pp)
    "pythia": (True, 0.25, "tanh", True, 1, 1),
    "pythia-tp2-seq": (True, 0.25, "tanh", True, 2, 0),
    "sequential-erf-full-rotary": (False, 1.0, "erf", True, 1, 1),
    "sequential-tp2-pipe": (False, 0.25, "erf", True, 2, 1),
    "no-biases-tp2-seq": (False, 1.0, "tanh", False, 2, 0),
    "parallel-full-rotary-erf-tp2": (True, 1.0, "erf", True, 2, 1),
}


def classic_shape(case: str):
    parallel, pct, gelu, bias, tp, pp = CASES[case]
    return tiny_shape(hidden_size=64, num_heads=4, num_kv_heads=4, ffn_size=128, norm="layernorm", activation="gelu",
                      gelu_approx=gelu, parallel_residual=parallel, rotary_pct=pct, attn_bias=bias, mlp_bias=bias,
                      layernorm_eps=1e-6, rotary_emb_base=5000, tp=tp, pp=pp, max_position_embeddings=64)


def hf_config(shape):
    return transformers.GPTNeoXConfig(
        vocab_size=shape.padded_vocab_size, hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, intermediate_size=shape.ffn_size,
        hidden_act="gelu_pytorch_tanh" if shape.gelu_approx == "tanh" else "gelu", rotary_pct=shape.rotary_pct,
        rotary_emb_base=shape.rotary_emb_base, max_position_embeddings=shape.max_position_embeddings,
        layer_norm_eps=shape.layernorm_eps, use_parallel_residual=shape.parallel_residual,
        attention_bias=shape.attn_bias, tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0,
    )


def hf_model(shape, seed=0):
    torch.manual_seed(seed)
    model = transformers.GPTNeoXForCausalLM(hf_config(shape)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.normal_(0, 0.3)
            elif name.endswith("bias") and not shape.mlp_bias and "mlp" in name:
                p.zero_()  # NeoX without use_bias_in_mlp: HF's always-present MLP biases stay zero
            else:
                p.normal_(0, 0.3)
    return model


def tokens(shape, n=2, t=13, seed=0):
    return torch.randint(0, shape.padded_vocab_size, (n, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("case", list(CASES))
def test_reference_model_equals_gpt_neox_through_neox_files(tmp_path, case):
    shape = classic_shape(case)
    hf = hf_model(shape)
    x = tokens(shape)
    with torch.no_grad():
        want = hf(x).logits
    write_checkpoint(tmp_path / "ck", shape, logical_from_hf(hf.state_dict(), shape))
    reader = CheckpointReader(tmp_path / "ck", shape)
    assert reader.format == ("sequential" if shape.pp == 0 else "pipeline") and reader.tp == shape.tp
    got = Transformer.from_state_dict(reader.shape, reader.state_dict())(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert want.std() > 0.5  # logits far from zero: a layout mistake could not hide


def _random_classic_sd(shape, seed=1):
    hf = hf_model(shape, seed)
    return logical_from_hf(hf.state_dict(), shape)


@pytest.mark.parametrize("case", ["pythia-tp2-seq", "sequential-erf-full-rotary", "no-biases-tp2-seq"])
def test_export_hf_loads_as_gpt_neox_with_the_same_logits(tmp_path, case):
    shape = classic_shape(case)
    sd = _random_classic_sd(shape)
    write_checkpoint(tmp_path / "ck", shape, sd)
    reader = CheckpointReader(tmp_path / "ck", shape)
    export_hf(reader, tmp_path / "hf", max_shard_bytes=40_000)  # forces several shards
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["GPTNeoXForCausalLM"] and cfg["intermediate_size"] == shape.ffn_size
    assert cfg["use_parallel_residual"] == shape.parallel_residual and cfg["rotary_pct"] == shape.rotary_pct
    assert cfg["layer_norm_eps"] == 1e-6
    assert cfg["hidden_act"] == {"tanh": "gelu_pytorch_tanh", "erf": "gelu"}[shape.gelu_approx]
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    x = tokens(shape, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, Transformer.from_state_dict(reader.shape, sd)(x), rtol=1e-5, atol=1e-5)


LOAD_438 = """
import json, sys, torch, transformers
from safetensors.torch import load_file
hf = transformers.GPTNeoXForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
x = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    torch.save({"version": transformers.__version__, "logits": hf(x).logits}, sys.argv[3])
"""


def _neox_venv_python() -> Path | None:
    if os.environ.get("NEOX_PYTHON"):
        return Path(os.environ["NEOX_PYTHON"])
    if os.environ.get("NEOX_DIR"):
        cand = Path(os.environ["NEOX_DIR"]).parent / "neox_venv" / "bin" / "python"
        return cand if cand.exists() else None
    return None


@pytest.mark.neox
def test_export_hf_loads_in_transformers_4_38(tmp_path):
    """NeoX's pinned transformers (4.38) names the head embed_out and reads rotary_pct directly."""
    py = _neox_venv_python()
    if py is None:
        pytest.skip("NeoX's virtualenv (transformers 4.38) not found beside NEOX_DIR; set NEOX_PYTHON")
    shape = classic_shape("pythia-tp2-seq")
    sd = _random_classic_sd(shape)
    write_checkpoint(tmp_path / "ck", shape, sd)
    export_hf(CheckpointReader(tmp_path / "ck", shape), tmp_path / "hf")
    x = tokens(shape, seed=2)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(py), "-c", LOAD_438, str(tmp_path / "hf"), json.dumps(x.tolist()), str(tmp_path / "out.pt")],
                   check=True, env=env, capture_output=True, text=True, timeout=300)
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert got["version"].startswith("4.")
    torch.testing.assert_close(got["logits"], Transformer.from_state_dict(shape, sd)(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("changes,needle", [
    ({"pos_emb": "learned"}, "learned position embeddings"),
    ({"num_kv_heads": 2}, "grouped-query attention"),
    ({"activation": "swiglu"}, "no transformers class combines"),
])
def test_classic_models_without_an_hf_equivalent_are_refused(tmp_path, changes, needle):
    shape = classic_shape("pythia").replace(**changes)
    write_checkpoint(tmp_path / "ck", shape, _logical_random(shape))
    with pytest.raises(UserError, match=needle) as info:
        export_hf(CheckpointReader(tmp_path / "ck", shape), tmp_path / "hf")
    assert "\n" not in str(info.value) and not (tmp_path / "hf").exists()


def _logical_random(shape):
    from tiny import random_sd
    return random_sd(shape)


def test_swapping_the_residual_form_changes_the_logits():
    """Negative control: gpt_j_residual true and false compute different functions on the same weights."""
    shape = classic_shape("pythia")
    sd = _random_classic_sd(shape)
    x = tokens(shape)
    a = Transformer.from_state_dict(shape, sd)(x)
    b = Transformer.from_state_dict(shape.replace(parallel_residual=False), sd)(x)
    assert (a - b).abs().max() > 0.1


def test_tanh_and_erf_gelu_differ_visibly():
    """Negative control for hidden_act: the export must say which GeLU NeoX used."""
    shape = classic_shape("pythia")
    sd = _random_classic_sd(shape)
    x = tokens(shape)
    a = Transformer.from_state_dict(shape, sd)(x)
    b = Transformer.from_state_dict(shape.replace(gelu_approx="erf"), sd)(x)
    assert (a - b).abs().max() > 1e-4


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
