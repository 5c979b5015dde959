"""import-hf against GPT-NeoX itself (NEOX_DIR; skipped without).

1. An independent writer: NeoX's tools/ckpts/convert_hf_llama_to_neox.py (its `convert_model`, run in NeoX's
   virtualenv on a transformers 4.38 LlamaForCausalLM built there and saved with save_pretrained, so the
   4.38 config.json format is read too) and import-hf convert the same HF model. For GQA the two write the
   same tensors, and both give transformers' logits. For MHA they differ, and only ours gives transformers'
   logits: NeoX's tool concatenates each TP rank's [q; k; v] blocks for every model, which is NeoX's GQA
   layout; NeoX reads an MHA `query_key_value` per head interleaved ([q_j; k_j; v_j], transformer.py's
   view(np, 3*d) path), so the tool's MHA checkpoints compute another function.
2. NeoX finetunes (`finetune: true`) from our import: its first training loss equals the loss transformers'
   model gives on NeoX's first batch.
3. NeoX's generate.py, greedy, from our import (its NeoX YAML written by --write-config, with the HF
   directory's tokenizer.json) equals transformers' greedy output of the HF model.
"""

import json
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from hf_import_util import build, hf_logits, ours, rel_err, save
from neox_run import CPU_KEYS, run_neox
from test_neox_classic import _run_in_neox_venv, free_port
from tiny import write_yaml

from neox_progressive.config import ModelShape
from neox_progressive.hf_import import import_hf
from neox_progressive.io.hf_reader import HFReader
from neox_progressive.io.reader import CheckpointReader
from neox_progressive.io.safe import load_pt

pytestmark = pytest.mark.neox

# Runs in NeoX's virtualenv (transformers 4.38): a random LlamaForCausalLM, saved; NeoX's converter's output of it.
CONVERT = r"""
import json, os, sys, torch, transformers
sys.path.insert(0, "tools/ckpts")
import convert_hf_llama_to_neox as conv
args = json.loads(sys.argv[1])
torch.manual_seed(args["seed"])
hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**args["config"])).eval()
with torch.no_grad():
    for name, p in hf.named_parameters():
        p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.3)
hf.save_pretrained(args["hf"])
conv.model = hf  # convert_model reads the layer count from this module global
ranks = conv.convert_model(hf.state_dict(), hf.config, args["tp"])
os.makedirs(args["neox"] + "/0")
open(args["neox"] + "/latest", "w").write("0")
for r, module in enumerate(ranks):
    torch.save({"dp_world_size": 1, "mp_world_size": args["tp"], "iteration": 1, "global_steps": 1,
                "skipped_steps": 1, "module": module}, args["neox"] + f"/0/mp_rank_{r:02d}_model_states.pt")
with torch.no_grad():
    torch.save(hf(torch.tensor(args["tokens"])).logits, args["hf"] + "/logits.pt")
"""


@pytest.mark.parametrize("kv,tp", [(2, 1), (2, 2), (4, 1), (4, 2)])
def test_neox_converter_and_ours_on_the_same_hf_model(tmp_path, kv, tp):
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(kv + tp))
    config = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv, rms_norm_eps=1e-5, rope_theta=5000.0, max_position_embeddings=64,
                  tie_word_embeddings=False)
    hf_dir, conv_dir = tmp_path / "hf", tmp_path / "neox_tool"
    _run_in_neox_venv(CONVERT, json.dumps({"hf": str(hf_dir), "neox": str(conv_dir), "tp": tp, "seed": kv,
                                           "config": config, "tokens": x.tolist()}))
    want = torch.load(hf_dir / "logits.pt", weights_only=True)
    assert "rope_theta" in json.loads((hf_dir / "config.json").read_text())  # the 4.38 format
    shape = HFReader(hf_dir).shape.replace(tp=tp, pp=0)
    yml = write_yaml(tmp_path / "m.yml", shape)
    import_hf(hf_dir, tmp_path / "ours", [yml])
    mine = CheckpointReader(tmp_path / "ours", ModelShape.from_yamls([yml]))
    theirs = CheckpointReader(conv_dir, ModelShape.from_yamls([yml]))
    err_ours = rel_err(ours(mine.shape, mine.state_dict(), x), want)
    err_theirs = rel_err(ours(theirs.shape, theirs.state_dict(), x), want)
    print(f"kv={kv} tp={tp}: relative error ours {err_ours:.2e}, NeoX's converter {err_theirs:.2e}")
    assert err_ours <= 1e-5
    a = [load_pt(p)["module"] for p in sorted((tmp_path / "ours" / "global_step0").glob("mp_rank_*"))]
    b = [load_pt(p)["module"] for p in sorted((conv_dir / "0").glob("mp_rank_*"))]
    assert [sorted(m) for m in a] == [sorted(m) for m in b]
    differ = sorted({k for ma, mb in zip(a, b) for k in ma if not torch.equal(ma[k], mb[k])})
    if kv < 4:   # GQA: NeoX's tool is right, and the two writers agree tensor for tensor
        assert differ == [] and err_theirs <= 1e-5
    else:        # MHA: only the fused QKV differs, and NeoX's tool's checkpoint is another model
        assert differ and all(k.endswith("attention.query_key_value.weight") for k in differ)
        assert err_theirs > 0.1


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from train_util import make_data

    return make_data(tmp_path_factory.mktemp("nximport"), n_chars=60_000)


@pytest.mark.parametrize("name,tp,fmt", [("llama-gqa", 1, "pipeline"), ("qwen2", 1, "sequential"),
                                         ("gpt-neox", 1, "pipeline")])
def test_neox_finetunes_from_our_import(data, tmp_path, name, tp, fmt):
    """NeoX loads the import strictly with `finetune: true`; its first training loss is transformers' on that batch
    (TP 1: NeoX on CPU runs one rank; TP 2 files are checked against transformers in test_hf_import.py)."""
    from test_train_neox import B, neox_batch, neox_config

    model = build(name, seed=4, vocab_size=512, max_position_embeddings=32)
    with torch.no_grad():  # a scale at which the loss is far from log(V) and not huge
        for p in model.parameters():
            p.mul_(0.3) if p.dim() > 1 else None
    src = save(model, tmp_path / "hf")
    yml = tmp_path / "member.yml"
    import_hf(src, tmp_path / "ck", write_config=yml, tp=tp, pp=int(fmt == "pipeline"))
    shape = ModelShape.from_yamls([yml])
    over = {"bias_gelu_fusion": shape.gelu_approx == "tanh"} if not shape.gated else {}
    cfg = neox_config(data, shape, data_path=data["train"], split="1000,0,0", train_iters=1, load=str(tmp_path / "ck"),
                      finetune=True, eval_interval=1000, master_port=free_port(), **over)
    (tmp_path / "nx.yml").write_text(yaml.safe_dump(cfg))
    log = run_neox("train.py", tmp_path / "nx.yml", log=tmp_path / "neox.log")
    assert "Unable to load checkpoint" not in log
    neox_first = float(re.search(r"iteration\s+1/\s*1 \|.*?lm_loss: ([0-9.E+-]+)", log).group(1))
    batch = neox_batch(data["train"], "train", 0, B)
    logits = hf_logits(model, batch[:, :-1])
    want = float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
    print(f"{name}: NeoX {neox_first:.7f} transformers {want:.7f}")
    assert neox_first == pytest.approx(want, abs=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name,fmt", [("llama-mha", "pipeline"), ("llama-gqa", "sequential")])
def test_neox_generate_from_our_import_equals_transformers_greedy(tmp_path, name, fmt):
    from test_neox_real import EOD, PROMPTS, word_tokenizer

    model = build(name, seed=5, vocab_size=64, rope_theta=5000.0)
    src = save(model, tmp_path / "hf")
    tok = word_tokenizer(src / "tokenizer.json")  # 64 tokens: the written config must pad to exactly 64
    yml = tmp_path / "member.yml"
    import_hf(src, tmp_path / "ck", write_config=yml, pp=int(fmt == "pipeline"))
    member = yaml.safe_load(yml.read_text())
    assert member["tokenizer_type"] == "HFTokenizer" and ModelShape.from_yamls([yml]).padded_vocab_size == 64
    (tmp_path / "in.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg = CPU_KEYS | {
        "load": str(tmp_path / "ck"), "no_load_rng": True, "train_micro_batch_size_per_gpu": 1, "train_iters": 1,
        "text_gen_type": "input-file", "sample_input_file": str(tmp_path / "in.txt"),
        "sample_output_file": str(tmp_path / "out.jsonl"), "maximum_tokens": 10, "temperature": 0.0,
        "top_k": 0, "top_p": 0.0, "prompt_end": "\n", "recompute": True, "master_port": free_port(),
    }
    (tmp_path / "gen.yml").write_text(yaml.safe_dump(cfg))
    run_neox("generate.py", yml, tmp_path / "gen.yml", log=tmp_path / "neox.log")
    neox = [json.loads(line)["text"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    want = []
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=EOD, pad_token_id=EOD)
        want.append(tok.decode([t for t in out[0, ids.shape[1]:].tolist() if t != EOD]))
    assert neox == want
    assert any(len(t.split()) >= 5 for t in neox)
