"""NeoX's classic transformer (Pythia-style) against GPT-NeoX's own code (NEOX_DIR; skipped without).

1. NeoX's tools/ckpts/convert_hf_to_sequential.py turns a transformers GPTNeoX model (4.38, NeoX's pin,
   built from a config in NeoX's virtualenv) into NeoX files (sequential and pipeline, TP 1 and 2, with
   its legacy `mlp.dense_h_to_4h` names and its split of row-parallel biases); our reader and reference
   model must give that HF model's logits.
2. NeoX trains a tiny classic model on CPU (sequential residual and gpt_j_residual); the reference model
   on the checkpoint it saved scores NeoX's first validation batch as NeoX did.
3. NeoX's generate.py, greedy, from a classic checkpoint we wrote equals transformers' GPTNeoX on our export.
"""

import json
import os
import re
import subprocess

import pytest
import torch
import yaml
from neox_run import CPU_KEYS, neox_dir, neox_python, run_neox, shim_dir
from test_train_neox import B, neox_batch, neox_config, reference_loss
from tiny import random_sd, tiny_shape
from train_util import make_data

from neox_progressive.hf import export_hf
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.io.writer import write_checkpoint
from neox_progressive.model import Transformer

pytestmark = pytest.mark.neox

# Runs in NeoX's virtualenv: NeoX's converter functions on a random transformers 4.38 GPTNeoX.
CONVERT = r"""
import json, sys, torch, transformers
sys.path.insert(0, "tools/ckpts")
import convert_hf_to_sequential as conv
args = json.loads(sys.argv[1])
out, tp, pp = args["out"], args["tp"], args["pp"]
torch.manual_seed(args["seed"])
hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**args["config"])).eval()
with torch.no_grad():
    for name, p in hf.named_parameters():
        p.uniform_(0.5, 1.5) if "norm" in name and name.endswith("weight") else p.normal_(0, 0.3)
seq = {}
conv.convert_hf_to_sequential(hf, seq)
L = hf.config.num_hidden_layers
meta = lambda module, n: {"module": module, "dp_world_size": 1, "mp_world_size": n, "iteration": 0}
if pp == 0:
    shards = {0: seq} if tp == 1 else conv.shard_sequential_mp(num_mp_ranks=tp, sequential=seq)
    for r, module in shards.items():
        torch.save(meta(module, tp), f"{out}/mp_rank_{r:02d}_model_states.pt")
else:
    files = conv.shard_pp(seq, 0, L) if tp == 1 else conv.shard_pp_mp(tp, seq, L)
    for name, sd in files.items():
        torch.save(sd, f"{out}/{name}")
    for r in range(tp):
        torch.save(meta(None, tp), f"{out}/mp_rank_{r:02d}_model_states.pt")
x = torch.tensor(args["tokens"])
with torch.no_grad():
    torch.save({"logits": hf(x).logits, "keys": sorted(seq)}, f"{out}/hf_logits.pt")
"""


def free_port() -> int:
    """A free TCP port for NeoX's rendezvous (other NeoX runs on this machine may hold 29500)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_in_neox_venv(code: str, *argv: str) -> None:
    env = dict(os.environ, NEOX_CPU_SHIM="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(shim_dir()))
    proc = subprocess.run([neox_python(), "-c", code, *argv], cwd=neox_dir(), env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def classic(**kw):
    base = dict(hidden_size=256, num_heads=4, num_kv_heads=4, ffn_size=1024, padded_vocab_size=256, norm="layernorm",
                activation="gelu", gelu_approx="erf", parallel_residual=True, rotary_pct=0.25, attn_bias=True,
                mlp_bias=True, layernorm_eps=1e-5, max_position_embeddings=64, seq_length=64)
    return tiny_shape(**{**base, **kw})


@pytest.mark.parametrize("tp,pp,parallel", [(1, 0, True), (1, 1, True), (2, 0, True), (2, 1, True), (2, 0, False)])
def test_reader_reads_neox_convert_hf_to_sequential(tmp_path, tp, pp, parallel):
    """Per-rank sizes are multiples of 128, so NeoX's converter shards without its padding branch."""
    shape = classic(tp=tp, pp=pp, parallel_residual=parallel)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    config = dict(vocab_size=256, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024,
                  rotary_pct=0.25, rotary_emb_base=10000, hidden_act="gelu", layer_norm_eps=1e-5,
                  use_parallel_residual=parallel, max_position_embeddings=64, tie_word_embeddings=False)
    out = tmp_path / "global_step0"
    out.mkdir()
    (tmp_path / "latest").write_text("global_step0")
    _run_in_neox_venv(CONVERT, json.dumps({"out": str(out), "tp": tp, "pp": pp, "seed": tp + pp, "config": config,
                                           "tokens": x.tolist()}))
    want = torch.load(out / "hf_logits.pt", weights_only=True)
    assert any("dense_h_to_4h" in k for k in want["keys"])  # the legacy names, read through arch.LEGACY_KEYS
    (out / "hf_logits.pt").unlink()
    reader = CheckpointReader(tmp_path, shape)
    assert reader.format == ("sequential" if pp == 0 else "pipeline") and reader.tp == tp
    got = Transformer.from_state_dict(reader.shape, reader.state_dict())(x)
    # NeoX's converter divides row-parallel biases by TP: right for gpt_j_residual, where each rank adds its bias
    # before the one all-reduce (our reader sums them); with the sequential residual NeoX adds the bias once.
    scale = want["logits"].abs().max()
    diff = (got - want["logits"]).abs().max() / scale
    print(f"tp={tp} pp={pp} parallel={parallel}: max |logit| {scale:.1f}, max relative difference {diff:.2e}")
    if tp > 1 and not parallel:
        assert diff > 1e-3
        return
    assert diff < 1e-5  # fp32 round-off between transformers 4.38's attention and ours


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("nxclassic"), n_chars=60_000)


@pytest.mark.parametrize("parallel,pos,gelu", [(True, "rotary", "tanh"), (False, "learned", "erf")])
def test_neox_trained_classic_checkpoint_scores_as_neox(data, tmp_path, parallel, pos, gelu):
    """NeoX trains (pp=0), saves and evaluates; the reference model on the saved files matches NeoX's loss.
    `bias_gelu_fusion: true` (NeoX's fused tanh GeLU, TorchScript) runs on the CPU too."""
    shape = classic(hidden_size=64, ffn_size=256, padded_vocab_size=None, pp=0, parallel_residual=parallel,
                    pos_emb=pos, rotary_pct=0.25, gelu_approx=gelu)
    cfg = neox_config(data, shape, train_data_paths=[data["train"]], valid_data_paths=[data["valid"]],
                      test_data_paths=[data["valid"]], train_iters=3, save=str(tmp_path / "nx"), checkpoint_factor=3,
                      eval_interval=3, eval_iters=1, bias_gelu_fusion=gelu == "tanh",
                      # large weights, so that GeLU inputs reach where the tanh approximation departs from erf
                      init_method="normal", output_layer_init_method="normal", init_method_std=0.3,
                      master_port=free_port())
    (tmp_path / "nx.yml").write_text(yaml.safe_dump(cfg))
    log = run_neox("train.py", tmp_path / "nx.yml", log=tmp_path / "neox.log")
    neox_eval = float(re.search(r"results at iteration 3 \| lm_loss value: ([0-9.E+-]+)", log).group(1))
    reader = CheckpointReader(tmp_path / "nx", shape)
    assert reader.part("final_norm")["final_norm.bias"].abs().sum() > 0  # trained: LayerNorm biases moved
    batch = neox_batch(data["valid"], "valid_0", 0, B)
    ours = reference_loss(tmp_path / "nx", shape, batch)
    print(f"NeoX {neox_eval:.7f} ours {ours:.7f}")
    assert ours == pytest.approx(neox_eval, abs=2e-5)
    # negative controls: the other GeLU, the other residual form miss NeoX's loss by more than the tolerance
    # and by far more than we do (NeoX prints the loss with 7 significant digits)
    for wrong in (dict(gelu_approx="erf" if gelu == "tanh" else "tanh"), dict(parallel_residual=not parallel)):
        miss = abs(reference_loss(tmp_path / "nx", shape.replace(**wrong), batch) - neox_eval)
        print(f"{wrong}: misses NeoX's loss by {miss:.2e}")
        assert miss > max(2e-5, 5 * abs(ours - neox_eval), 5e-6), wrong


def test_neox_finetunes_from_a_builtin_classic_checkpoint(data, tmp_path):
    """The builtin engine trains a classic model (pipeline files); NeoX loads it strictly with `finetune: true`
    and its first training loss equals the reference model's on NeoX's first batch."""
    import numpy as np
    from train_util import stage_config, write_stage

    from neox_progressive.train import train_stage

    shape = classic(hidden_size=32, ffn_size=128, num_heads=2, num_kv_heads=2, padded_vocab_size=None, pp=1, seq_length=32,
                    max_position_embeddings=32, gelu_approx="tanh")
    stage = stage_config(data, tmp_path / "ck", shape, train_iters=60, checkpoint_factor=60)
    res = train_stage(write_stage(tmp_path / "s.yml", stage), device="cpu", quiet=True)
    cfg = neox_config(data, shape, data_path=data["train"], split="1000,0,0", train_iters=1, load=str(res.save_dir),
                      finetune=True, eval_interval=1000, bias_gelu_fusion=True, master_port=free_port())
    (tmp_path / "nx.yml").write_text(yaml.safe_dump(cfg))
    log = run_neox("train.py", tmp_path / "nx.yml", log=tmp_path / "neox.log")
    assert "Unable to load checkpoint" not in log
    neox_first = float(re.search(r"iteration\s+1/\s*1 \|.*?lm_loss: ([0-9.E+-]+)", log).group(1))
    ours = reference_loss(res.save_dir, shape, neox_batch(data["train"], "train", 0, B))
    assert ours == pytest.approx(neox_first, abs=2e-5)
    assert neox_first < np.log(512) - 0.5                    # trained weights, not a random init


def _word_tokenizer(path):
    from test_neox_real import word_tokenizer
    return word_tokenizer(path)


@pytest.mark.slow
@pytest.mark.parametrize("pp,parallel", [(1, True), (0, False)])
def test_neox_generate_matches_gpt_neox_on_our_export(tmp_path, pp, parallel):
    transformers = pytest.importorskip("transformers")
    from test_neox_real import EOD, PROMPTS
    tok = _word_tokenizer(tmp_path / "tokenizer.json")
    shape = classic(hidden_size=32, ffn_size=64, padded_vocab_size=64, num_heads=4, pp=pp, parallel_residual=parallel,
                    rotary_pct=0.5, make_vocab_size_divisible_by=64, rotary_emb_base=5000)
    write_checkpoint(tmp_path / "ck", shape, random_sd(shape, std=0.5, seed=pp))
    (tmp_path / "in.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = shape.to_neox() | CPU_KEYS | {
        "tokenizer_type": "HFTokenizer", "vocab_file": str(tmp_path / "tokenizer.json"),
        "load": str(tmp_path / "ck"), "no_load_rng": True, "train_micro_batch_size_per_gpu": 1, "train_iters": 1,
        "text_gen_type": "input-file", "sample_input_file": str(tmp_path / "in.txt"),
        "sample_output_file": str(tmp_path / "out.jsonl"), "maximum_tokens": 10, "temperature": 0.0,
        "top_k": 0, "top_p": 0.0, "prompt_end": "\n", "recompute": True, "master_port": free_port(),
    }
    (tmp_path / "gen.yml").write_text(yaml.safe_dump(cfg))
    run_neox("generate.py", tmp_path / "gen.yml", log=tmp_path / "neox.log")
    neox = [json.loads(line)["text"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    export_hf(CheckpointReader(tmp_path / "ck", shape), tmp_path / "hf", eos=EOD)
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        out = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=EOD, pad_token_id=EOD)
        ours.append(tok.decode([t for t in out[0, ids.shape[1]:].tolist() if t != EOD]))
    assert neox == ours
    assert any(len(t.split()) >= 5 for t in neox)


def test_neox_shipped_configs_read_as_neox_builds_them():
    """NeoX's own configs/pythia/*.yml are the classic transformer (4h GeLU width, tanh GeLU, parallel residual,
    25% rotary); its TransformerEngine, MoE and sliding-window configs are refused naming the key."""
    from neox_progressive.config import ModelShape, merge_neox_configs
    from neox_progressive.errors import UserError

    pythia = sorted((neox_dir() / "configs" / "pythia").glob("*.yml"))
    assert len(pythia) >= 8
    for path in pythia:
        cfg = merge_neox_configs([path])  # some of them spell keys with dashes
        shape = ModelShape.from_yamls([path])
        assert shape.architecture == "neox" and shape.gelu_approx == "tanh" and shape.parallel_residual, path
        assert shape.ffn_size == 4 * cfg["hidden_size"] and shape.rotary_dims == int(shape.head_dim * 0.25), path
        assert shape.attn_bias and shape.mlp_bias and shape.norm_eps == 1e-5, path
    for name, key in (("1-3B-transformer-engine.yml", "te_mha"), ("125M-dmoe.yml", "moe_num_experts"),
                      ("mistral/7B.yml", "sliding_window_width")):
        with pytest.raises(UserError, match=f"config key {key}:"):
            ModelShape.from_yamls([neox_dir() / "configs" / name])
