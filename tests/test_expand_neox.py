"""Real GPT-NeoX (NEOX_DIR) in the loop: NeoX trains a tiny source model and saves it; we expand NeoX's own
checkpoint; NeoX loads the expansion with `finetune: true` and trains, and its first logged loss equals the
reference model's loss on the expanded weights (on NeoX's own first batch). For FPI that is also the source
model's loss; for AKI it is a trained model's loss, far below a random init's ln(V). Both architectures: the
Llama shape (GQA 4/2) and NeoX's classic transformer (Pythia-style: LayerNorm with bias, tanh GeLU through NeoX's
fused `bias_gelu`, biases, gpt_j_residual, rotary_pct 0.25). Last, NeoX's generate.py, greedy, from our AKI
expansion of a classic model equals transformers' GPTNeoXForCausalLM on our export of it."""

import json
import math

import pytest
import torch
import yaml
from neox_run import CPU_KEYS, run_neox
from test_train_neox import B, neox_batch, neox_config, reference_loss
from tiny import random_sd, write_yaml
from train_util import make_data, tiny_shape

from neox_progressive.expand import ExpandOptions, expand_checkpoint
from neox_progressive.train import check_stage_start, parse_neox_losses

pytestmark = [pytest.mark.neox, pytest.mark.slow]
CLASSIC = dict(norm="layernorm", layernorm_eps=1e-5, activation="gelu", gelu_approx="tanh", parallel_residual=True,
               rotary_pct=0.25, attn_bias=True, mlp_bias=True, hidden_size=64, num_heads=4, num_kv_heads=4, ffn_size=128)
ARCH = {"llama": {}, "classic": CLASSIC}


def _neox_keys(shape) -> dict:
    """What CPU_KEYS would otherwise override: NeoX's fused tanh GeLU is `bias_gelu_fusion: true` (runs on CPU)."""
    return {"bias_gelu_fusion": True} if shape.activation == "gelu" and shape.gelu_approx == "tanh" else {}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("expand_neox_data"), n_chars=60_000)


@pytest.fixture(scope="module", params=list(ARCH))
def source(tmp_path_factory, data, request):
    """A NeoX-trained tiny model (pipeline format), saved by NeoX itself."""
    root = tmp_path_factory.mktemp(f"expand_neox_{request.param}")
    shape = tiny_shape(pp=1, **ARCH[request.param])
    cfg = neox_config(data, shape, data_path=data["train"], split="1000,0,0", train_iters=150, save=str(root / "src"),
                      checkpoint_factor=150, eval_interval=1000,
                      optimizer={"type": "lion", "params": {"lr": 3e-3, "betas": [0.9, 0.99]}}, min_lr=3e-4,
                      **_neox_keys(shape))
    (root / "src.yml").write_text(yaml.safe_dump(cfg))
    _clear_index_maps(data)
    run_neox("train.py", root / "src.yml", log=root / "src.log")
    return request.param, root, shape


def _clear_index_maps(data) -> None:
    """NeoX caches its sample index beside the data; the tests read the one of the run they check."""
    from pathlib import Path

    for f in Path(data["train"]).parent.glob("*_indexmap_*"):
        f.unlink()


def _target(arch: str, src, method: str, pp: int):
    if arch == "llama":
        return src.replace(hidden_size=48, num_heads=6, num_kv_heads=3, ffn_size=96, num_layers=3, pp=pp), {}
    if method == "fpi":  # exact for LayerNorm: integer width ratio, balanced maps, added layers zeroed
        dst = src.replace(hidden_size=128, num_heads=8, num_kv_heads=8, ffn_size=192, num_layers=3, pp=pp)
        return dst, {"map_sampling": "balanced"}
    return src.replace(hidden_size=96, num_heads=6, num_kv_heads=6, ffn_size=192, num_layers=3, pp=pp), {}


@pytest.mark.parametrize("method,pp", [("aki", 1), ("fpi", 0)])
def test_neox_finetunes_from_the_expansion(source, data, tmp_path, method, pp):
    arch, root, src = source
    dst, extra = _target(arch, src, method, pp)
    base = dict(data_path=data["train"], split="1000,0,0", eval_interval=1000, **_neox_keys(dst))
    (tmp_path / "dst_arch.yml").write_text(yaml.safe_dump(neox_config(data, dst, **base, train_iters=3)))
    opts = ExpandOptions(method=method, new_layer_init="zero_out" if method == "fpi" else "copy", **extra)
    rec = expand_checkpoint(root / "src", [root / "src.yml"], [tmp_path / "dst_arch.yml"], tmp_path / "exp", opts,
                            quiet=True, stage="neox-test")
    assert rec["source_iteration"] == 150 and rec["exact"] is (method == "fpi"), rec["exact_reason"]
    cfg = neox_config(data, dst, **base, train_iters=3, load=str(tmp_path / "exp"), finetune=True)
    (tmp_path / "dst.yml").write_text(yaml.safe_dump(cfg))
    _clear_index_maps(data)
    log = run_neox("train.py", tmp_path / "dst.yml", log=tmp_path / "dst.log")
    assert "Unable to load checkpoint" not in log
    losses = [loss for _, loss in parse_neox_losses(log)]
    batch = neox_batch(data["train"], "train", 0, B)
    expanded = reference_loss(tmp_path / "exp", dst, batch)
    source_loss = reference_loss(root / "src", src, batch)
    print(f"{arch} {method}: NeoX first losses {losses}, reference on expanded {expanded:.6f}, source "
          f"{source_loss:.6f}, ln V {math.log(512):.3f}")
    assert losses[0] == pytest.approx(expanded, abs=2e-5)
    check = check_stage_start(expanded, losses, 512)  # later steps stay near it (no master-weight trap)
    assert check.verdict == "expanded", check.message
    if method == "fpi":
        assert expanded == pytest.approx(source_loss, abs=1e-4)


@pytest.mark.parametrize("pp", [1, 0])
def test_neox_generate_from_a_classic_expansion_matches_gpt_neox_on_our_export(tmp_path, pp):
    transformers = pytest.importorskip("transformers")
    from test_neox_real import EOD, PROMPTS, word_tokenizer

    from neox_progressive.hf import export_hf
    from neox_progressive.io.reader import CheckpointReader
    from neox_progressive.io.writer import write_checkpoint

    tok = word_tokenizer(tmp_path / "tokenizer.json")
    src = tiny_shape(**(CLASSIC | dict(hidden_size=32, ffn_size=64, rotary_pct=0.5, parallel_residual=pp == 1)),
                     padded_vocab_size=64, make_vocab_size_divisible_by=64, seq_length=64, max_position_embeddings=64,
                     rotary_emb_base=5000)
    dst = src.replace(hidden_size=48, num_heads=6, num_kv_heads=6, ffn_size=96, num_layers=3, pp=pp)
    write_checkpoint(tmp_path / "src", src, random_sd(src, std=0.5, seed=pp))
    tokenizer = {"tokenizer_type": "HFTokenizer", "vocab_file": str(tmp_path / "tokenizer.json")}
    rec = expand_checkpoint(tmp_path / "src", [write_yaml(tmp_path / "src.yml", src, **tokenizer)],
                            [write_yaml(tmp_path / "dst.yml", dst, **tokenizer)], tmp_path / "exp",
                            ExpandOptions(method="aki"), quiet=True)
    assert rec["target"]["num_layers"] == 3 and rec["exact"] is False
    (tmp_path / "in.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = dst.to_neox() | CPU_KEYS | _neox_keys(dst) | tokenizer | {
        "load": str(tmp_path / "exp"), "no_load_rng": True, "train_micro_batch_size_per_gpu": 1, "train_iters": 1,
        "text_gen_type": "input-file", "sample_input_file": str(tmp_path / "in.txt"),
        "sample_output_file": str(tmp_path / "out.jsonl"), "maximum_tokens": 10, "temperature": 0.0,
        "top_k": 0, "top_p": 0.0, "prompt_end": "\n", "recompute": True,
    }
    (tmp_path / "gen.yml").write_text(yaml.safe_dump(cfg))
    run_neox("generate.py", tmp_path / "gen.yml", log=tmp_path / "neox.log")
    neox = [json.loads(line)["text"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    export_hf(CheckpointReader(tmp_path / "exp", dst), tmp_path / "hf", eos=EOD)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_act"] == "gelu_pytorch_tanh"
    hf = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ours = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        out = hf.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=EOD, pad_token_id=EOD)
        ours.append(tok.decode([t for t in out[0, ids.shape[1]:].tolist() if t != EOD]))
    print(f"pp={pp}: NeoX {neox}, transformers {ours}")
    assert neox == ours
    assert any(len(t.split()) >= 5 for t in neox)  # generated something, not just an immediate stop
