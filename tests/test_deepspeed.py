"""Real DeepSpeed loads what we write, and we read what DeepSpeed saves (CPU, gloo, one process)."""

import random

import numpy as np
import pytest
import torch
from tiny import random_sd, tiny_shape

from neox_progressive.io.reader import CheckpointReader
from neox_progressive.io.writer import write_checkpoint
from neox_progressive.model import Transformer

pytest.importorskip("deepspeed")
from neox_pipe import build_pipe, ds_engine, ds_load, ds_save, pipe_logits  # noqa: E402

pytestmark = pytest.mark.deepspeed


@pytest.mark.parametrize("kv,bias", [(4, False), (2, False), (1, True)])
def test_deepspeed_pipeline_module_loads_our_checkpoint(tmp_path, kv, bias):
    shape = tiny_shape(num_kv_heads=kv, attn_bias=bias, mlp_bias=bias, rotary_pct=0.5 if bias else 1.0)
    sd = random_sd(shape)
    write_checkpoint(tmp_path / "ck", shape, sd)
    pipe = build_pipe(shape, seed=1)
    engine = ds_engine(pipe)
    x = torch.randint(0, shape.padded_vocab_size, (2, 9))
    want = Transformer.from_state_dict(shape, sd)(x).detach()
    assert (pipe_logits(pipe, x) - want).abs().max() > 0.1  # random init differs before loading
    ds_load(engine, tmp_path / "ck")  # strict keys: a missing or extra tensor raises here
    torch.testing.assert_close(pipe_logits(pipe, x), want, rtol=1e-5, atol=1e-5)


CLASSIC = dict(norm="layernorm", activation="gelu", attn_bias=True, mlp_bias=True, layernorm_eps=1e-6,
               max_position_embeddings=16)


@pytest.mark.parametrize("kw", [
    dict(parallel_residual=True, rotary_pct=0.25, gelu_approx="tanh"),
    dict(parallel_residual=False, pos_emb="learned", gelu_approx="erf"),
    dict(parallel_residual=False, rotary_pct=1.0, gelu_approx="erf", attn_bias=False, mlp_bias=False),
], ids=["pythia", "learned-positions", "no-biases"])
def test_deepspeed_loads_our_classic_checkpoint_and_we_read_what_it_saves(tmp_path, kw):
    shape = tiny_shape(**{**CLASSIC, **kw})
    sd = random_sd(shape)
    write_checkpoint(tmp_path / "ck", shape, sd)
    pipe = build_pipe(shape, seed=1)
    engine = ds_engine(pipe)
    x = torch.randint(0, shape.padded_vocab_size, (2, 9))
    want = Transformer.from_state_dict(shape, sd)(x).detach()
    assert (pipe_logits(pipe, x) - want).abs().max() > 0.1
    ds_load(engine, tmp_path / "ck")
    torch.testing.assert_close(pipe_logits(pipe, x), want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # new weights in DeepSpeed, saved by DeepSpeed, read by us
        for p in pipe.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    ds_save(engine, tmp_path / "ds", "global_step5", {"iteration": 5})
    reader = CheckpointReader(tmp_path / "ds", shape)
    got = Transformer.from_state_dict(reader.shape, reader.state_dict())(x)
    torch.testing.assert_close(got, pipe_logits(pipe, x), rtol=1e-5, atol=1e-5)


def test_deepspeed_refuses_an_extra_key(tmp_path):
    """Strict loading is the validation NeoX relies on; make sure our harness really is strict."""
    shape = tiny_shape(num_layers=1)
    write_checkpoint(tmp_path / "ck", shape, random_sd(shape))
    f = tmp_path / "ck" / "global_step0" / "layer_02-model_00-model_states.pt"
    state = torch.load(f, weights_only=True)
    state["attention.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save(state, f)
    engine = ds_engine(build_pipe(shape))
    with pytest.raises(RuntimeError, match="inv_freq"):
        ds_load(engine, tmp_path / "ck")


@pytest.mark.parametrize("kv", [4, 2])
def test_we_read_what_deepspeed_saves(tmp_path, kv):
    shape = tiny_shape(num_kv_heads=kv)
    pipe = build_pipe(shape, seed=3)
    engine = ds_engine(pipe)
    client = {"iteration": 12, "np_rng_state": np.random.get_state(), "random_rng_state": random.getstate(),
              "torch_rng_state": torch.get_rng_state(), "args": {"num_layers": shape.num_layers}}
    ds_save(engine, tmp_path / "ds", "global_step12", client)
    reader = CheckpointReader(tmp_path / "ds", shape.replace(padded_vocab_size=None))
    assert reader.tag == "global_step12" and reader.iteration == 12 and reader.format == "pipeline"
    x = torch.randint(0, shape.padded_vocab_size, (2, 9))
    got = Transformer.from_state_dict(reader.shape, reader.state_dict())(x)
    torch.testing.assert_close(got, pipe_logits(pipe, x), rtol=1e-5, atol=1e-5)
