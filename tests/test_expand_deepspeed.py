"""DeepSpeed in the loop: expand a checkpoint DeepSpeed itself saved from a NeoX-named PipelineModule,
load the result into a PipelineModule of the target shape (module only, strict keys, as NeoX's
finetune does), and compare its logits with the reference model's on the expanded weights."""

import pytest
import torch
from expand_util import logits, rel_err, shape, tokens, wider
from tiny import write_yaml

from neox_progressive.expand import ExpandOptions, expand_checkpoint
from neox_progressive.io.reader import read_checkpoint

pytest.importorskip("deepspeed")
from neox_pipe import build_pipe, ds_engine, ds_load, ds_save, pipe_logits  # noqa: E402

pytestmark = pytest.mark.deepspeed


@pytest.mark.parametrize("method,kv,dst_heads,dst_kv", [("aki", 4, 6, 6), ("fpi", 2, 6, 3), ("aki", 2, 6, 2)])
def test_expand_what_deepspeed_saved_and_load_it_back(tmp_path, method, kv, dst_heads, dst_kv):
    src = shape(num_kv_heads=kv, num_layers=2)
    dst = wider(src, dst_heads, dst_kv, ffn=64, num_layers=3)
    src_pipe = build_pipe(src, seed=5)
    ds_save(ds_engine(src_pipe), tmp_path / "ds", "global_step5", {"iteration": 5})
    src_yml, dst_yml = write_yaml(tmp_path / "src.yml", src), write_yaml(tmp_path / "dst.yml", dst)
    opts = ExpandOptions(method=method, new_layer_init="zero_out" if method == "fpi" else "copy")
    rec = expand_checkpoint(tmp_path / "ds", [src_yml], [dst_yml], tmp_path / "out", opts, quiet=True, stage="t")
    assert rec["source_iteration"] == 5 and rec["source_tag"] == "global_step5"

    dst_pipe = build_pipe(dst.replace(padded_vocab_size=src.padded_vocab_size), seed=9)
    engine = ds_engine(dst_pipe)
    x = tokens(src)
    dshape, dsd = read_checkpoint(tmp_path / "out", [dst_yml])
    want = logits(dshape, dsd, x)
    assert rel_err(pipe_logits(dst_pipe, x), want) > 0.1  # before loading: random init
    ds_load(engine, tmp_path / "out")
    got = pipe_logits(dst_pipe, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    src_logits = pipe_logits(src_pipe, x)
    err = rel_err(got, src_logits)
    if method == "fpi":
        assert err <= 1e-5  # DeepSpeed's own source and target modules agree
    else:
        assert err > 1e-3
