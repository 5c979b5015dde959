"""HF-native growth (`expand --src HF_DIR`): transformers is the independent implementation on both ends.

Source models are built in-process from configs (no downloads) and saved with save_pretrained; the output is
loaded with AutoModelForCausalLM. FPI keeps the logits (every GQA layout, the general case included, biases,
tied embeddings, the classic GPTNeoX); AKI satisfies EXPANSION_SPEC section 10 item 5; the NeoX path and the
HF path give the same tensors; bad input is one line and nothing is written."""

import json

import pytest
import torch
from cli_util import cli, one_line_error, snapshot
from hf_import_util import build, hf_logits, rel_err, save, tokens
from test_expand_aki import LAYER_KEYS, new_mask
from tiny import write_yaml

from neox_progressive.expand import ExpandOptions, expand_checkpoint, load_maps
from neox_progressive.expand.hf_run import expand_hf
from neox_progressive.io.hf_reader import HFReader
from neox_progressive.io.reader import read_checkpoint
from neox_progressive.io.writer import write_checkpoint

transformers = pytest.importorskip("transformers")
TOL = 1e-5

# name: (source model, source overrides, target (heads, kv heads, ffn, layers), options, target given as)
FPI = {
    "mha 4/4->6/6": ("llama-mha", {}, (6, 6, 64, 3), {}, "hf"),
    "gqa g_fixed 4/2->6/3": ("llama-gqa", {}, (6, 3, 64, 3), {}, "yaml"),
    "gqa kv_fixed 4/2->8/2": ("llama-gqa", {}, (8, 2, 64, 4), {}, "hf"),
    "general 5/1->8/4 head_dim 4": ("llama-gqa", dict(hidden_size=20, num_attention_heads=5, num_key_value_heads=1),
                                    (8, 4, 64, 3), {}, "hf"),
    "mha->gqa 4/4->8/4": ("llama-mha", {}, (8, 4, 64, 2), {}, "yaml"),
    "gqa->mha 4/2->8/8": ("llama-gqa", {}, (8, 8, 64, 3), {}, "hf"),
    "qwen2 biases 4/2->6/3": ("qwen2", {}, (6, 3, 64, 3), {}, "hf"),
    "tied 4/2->6/3": ("llama-tied", {}, (6, 3, 48, 3), {}, "yaml"),
    "mistral 4/2->6/3": ("mistral", {}, (6, 3, 64, 3), {}, "hf"),
    "gpt-neox x2 balanced": ("gpt-neox", {}, (8, 8, 96, 3), dict(map_sampling="balanced"), "hf"),
}


def target_config(src_dir, heads, kv, ffn, layers):
    """The source's config.json with the target's shape (head_dim kept), as a user would edit it."""
    cfg = json.loads((src_dir / "config.json").read_text())
    d = cfg["hidden_size"] // cfg["num_attention_heads"]
    cfg.update(hidden_size=heads * d, num_attention_heads=heads, intermediate_size=ffn, num_hidden_layers=layers)
    if "num_key_value_heads" in cfg:
        cfg["num_key_value_heads"] = kv
    cfg.pop("head_dim", None)
    cfg.pop("layer_types", None)
    return cfg


def target_yaml(path, src_dir, heads, kv, ffn, layers):
    shape = HFReader(src_dir).shape
    dst = shape.replace(hidden_size=heads * shape.head_dim, num_heads=heads, num_kv_heads=kv, ffn_size=ffn,
                        num_layers=layers, padded_vocab_size=None)
    return write_yaml(path, dst)


def grow(tmp_path, name, over, target, options, given="hf", out="out", **kw):
    """Save the source, expand it through the HF path; (source model, source dir, out dir, record)."""
    model = build(name, **over)
    src = tmp_path / "src"
    if not src.exists():
        save(model, src)
    if given == "hf":
        dst = tmp_path / f"{out}.json"
        dst.write_text(json.dumps(target_config(src, *target)))
    else:
        dst = target_yaml(tmp_path / f"{out}.yml", src, *target)
    record = expand_hf(src, [dst], tmp_path / out, ExpandOptions(**options), quiet=True, **kw)
    return model, src, tmp_path / out, record


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), torch_dtype=torch.float32).eval()  # 4.38 and 5.x


@pytest.mark.parametrize("case", list(FPI))
def test_fpi_output_loads_in_transformers_with_the_source_logits(tmp_path, case):
    name, over, target, options, given = FPI[case]
    model, _, out, record = grow(tmp_path, name, over, target, dict(method="fpi", new_layer_init="zero_out", **options),
                                 given, max_shard_bytes=30_000)  # several shards
    assert record["exact"], record["exact_reason"]
    big = load(out)
    heads, kv, ffn, layers = target
    assert (big.config.num_attention_heads, big.config.intermediate_size, big.config.num_hidden_layers) == \
        (heads, ffn, layers)
    assert getattr(big.config, "num_key_value_heads", heads) == kv and type(big).__name__ == type(model).__name__
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not big.config.tie_word_embeddings
    x = tokens()
    want = hf_logits(model, x)
    assert want.std() > 0.5
    assert rel_err(hf_logits(big, x), want) <= TOL
    manifest = json.loads((out / "expansion.json").read_text())
    assert manifest["source_format"] == "hf" and set(manifest["source_sha256"]) >= {"config.json"}


def test_aki_output_satisfies_the_spec(tmp_path):
    """EXPANSION_SPEC section 10 item 5 on HF files: AKI = FPI (same maps, rms_comp none) on old units, the top
    layer, the embedding and head; new units' rows are layer l+1's rows at g(j) with IN_h applied."""
    target = (6, 3, 64, 2)
    _, src, aki_dir, _ = grow(tmp_path, "llama-bias", {}, target, dict(method="aki"), out="aki")
    _, _, fpi_dir, _ = grow(tmp_path, "llama-bias", {}, target, dict(method="fpi", rms_comp="none"), out="fpi")
    sd, aki, fpi = HFReader(src).state_dict(), HFReader(aki_dir).state_dict(), HFReader(fpi_dir).state_dict()
    m = load_maps(aki_dir)
    assert all((m[k] == v).all() for k, v in load_maps(fpi_dir).items())
    gh = torch.from_numpy(m["hidden"])
    c = torch.bincount(gh, minlength=32).float()
    for key in ("embed.weight", "final_norm.weight", "head.weight", *(f"layers.1.{k}" for k in LAYER_KEYS)):
        assert torch.equal(aki[key], fpi[key]), key
    p, u = "layers.0.", "layers.1."
    for key in ("attn.o.weight", "mlp.down.weight", "attn_norm.weight", "mlp_norm.weight", "attn.o.bias"):
        assert torch.equal(aki[p + key], fpi[p + key]), key
    some_new = False
    for key, gkey, block in (("attn.q", "heads", 8), ("attn.k", "kv_heads", 8), ("attn.v", "kv_heads", 8),
                             ("mlp.gate", "ffn", 1), ("mlp.up", "ffn", 1)):
        g = torch.from_numpy(m[f"layer0.{gkey}"])
        new = new_mask(g).repeat_interleave(block)
        some_new |= bool(new.any())
        w = aki[p + key + ".weight"]
        assert torch.equal(w[~new], fpi[p + key + ".weight"][~new]), key
        src_rows = g.repeat_interleave(block) * block + torch.arange(len(g) * block) % block
        want = (sd[u + key + ".weight"][src_rows][:, gh] / c[gh])[new]
        torch.testing.assert_close(w[new], want, rtol=1e-6, atol=1e-7)
        if key.startswith("attn"):
            torch.testing.assert_close(aki[p + key + ".bias"][new], sd[u + key + ".bias"][src_rows][new])
    assert some_new
    x = tokens()
    got = hf_logits(load(aki_dir), x)
    assert torch.isfinite(got).all() and rel_err(got, hf_logits(load(fpi_dir), x)) > 1e-3


@pytest.mark.parametrize("name,target,options", [
    ("llama-gqa", (8, 4, 64, 3), {}),
    ("qwen2", (8, 4, 60, 4), dict(aki_second="upper", aki_hidden="upper", seed=3)),
    ("gpt-neox", (6, 6, 64, 3), dict(method="fpi", map_sampling="balanced")),
])
def test_neox_path_and_hf_path_give_the_same_tensors(tmp_path, name, target, options):
    """The same model imported into NeoX (TP 2 target there) and grown by the NeoX path equals the HF path's output
    read back as logical tensors, bit for bit."""
    model = build(name)
    src = save(model, tmp_path / "src")
    reader = HFReader(src)  # the import (Qwen2's absent o bias as zeros), read like import-hf does
    shape = reader.shape
    write_checkpoint(tmp_path / "neox-src", shape, reader.state_dict())
    src_yml = write_yaml(tmp_path / "src.yml", shape)
    dst_yml = target_yaml(tmp_path / "dst.yml", src, *target)
    dst_tp2 = write_yaml(tmp_path / "dst-tp2.yml", read_yaml_shape(dst_yml).replace(tp=2, make_vocab_size_divisible_by=16))
    opts = ExpandOptions(**options)
    expand_checkpoint(tmp_path / "neox-src", [src_yml], [dst_tp2], tmp_path / "neox-out", opts, quiet=True)
    expand_hf(src, [dst_yml], tmp_path / "hf-out", opts, quiet=True)
    neox = read_checkpoint(tmp_path / "neox-out", [dst_tp2])[1]
    ours = HFReader(tmp_path / "hf-out").state_dict()
    assert neox.keys() == ours.keys()
    assert all(torch.equal(neox[k], ours[k]) for k in neox), [k for k in neox if not torch.equal(neox[k], ours[k])]
    assert (load_maps(tmp_path / "neox-out")["hidden"] == load_maps(tmp_path / "hf-out")["hidden"]).all()


def read_yaml_shape(path):
    from neox_progressive.config import ModelShape

    return ModelShape.from_yamls([path])


def test_bf16_source_stays_bf16_with_tokenizer_and_generation_config(tmp_path):
    model = build("llama-gqa").to(torch.bfloat16)
    src = save(model, tmp_path / "src")
    (src / "tokenizer.json").write_text('{"fake": true}')
    (src / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    gen = json.loads((src / "generation_config.json").read_text()) if (src / "generation_config.json").exists() else None
    dst = tmp_path / "dst.json"
    dst.write_text(json.dumps(target_config(src, 6, 3, 64, 3)))
    res = cli("expand", "--src", src, "--dst-config", dst, "--out", tmp_path / "out", "--quiet")
    assert res.returncode == 0, res.stderr[-2000:]
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == '{"fake": true}' and (out / "tokenizer_config.json").exists()
    if gen is not None:
        assert json.loads((out / "generation_config.json").read_text()) == gen
    big = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype="auto").eval()  # 5.x default
    assert big.dtype == torch.bfloat16 and (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert "wrote" in res.stdout and "LlamaForCausalLM" in res.stdout


def _setup_bad(tmp_path):
    model = build("llama-gqa")
    src = save(model, tmp_path / "src", max_shard_size="20KB")
    dst = tmp_path / "dst.json"
    dst.write_text(json.dumps(target_config(src, 6, 3, 64, 3)))
    return src, dst


@pytest.mark.parametrize("case", ["missing shard", "destination exists", "unsupported architecture",
                                  "other target architecture", "smaller target", "src-config given", "dry run",
                                  "target layer_types", "target vocab"])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, case):
    src, dst = _setup_bad(tmp_path)
    out = tmp_path / "out"
    args = ["expand", "--src", src, "--dst-config", dst, "--out", out]
    expect = {"missing shard": "does not exist", "destination exists": "already exists",
              "unsupported architecture": "architectures", "other target architecture": "keeps the architecture",
              "smaller target": "only grows", "src-config given": "--src-config", "dry run": None,
              "target layer_types": "layer_types", "target vocab": "keeps the vocabulary"}[case]
    if case == "missing shard":
        index = json.loads((src / "model.safetensors.index.json").read_text())
        (src / sorted(set(index["weight_map"].values()))[1]).unlink()
    elif case == "destination exists":
        out.mkdir()
        (out / "keep").write_text("mine")
    elif case == "unsupported architecture":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "architectures": ["FalconForCausalLM"]}))
    elif case == "other target architecture":
        dst.write_text(json.dumps({**json.loads(dst.read_text()), "architectures": ["MistralForCausalLM"]}))
    elif case == "smaller target":
        dst.write_text(json.dumps({**json.loads(dst.read_text()), "intermediate_size": 32}))
    elif case == "target layer_types":
        dst.write_text(json.dumps({**json.loads(dst.read_text()), "layer_types": ["full_attention"] * 2}))
    elif case == "target vocab":
        dst.write_text(json.dumps({**json.loads(dst.read_text()), "vocab_size": 128}))
    elif case == "src-config given":
        args += ["--src-config", dst]
    else:
        args += ["--dry-run"]
    before = snapshot(tmp_path)
    res = cli(*args)
    if expect is None:
        assert res.returncode == 0 and "nothing written" in res.stdout and "hidden" in res.stdout
    else:
        line = one_line_error(res)
        assert expect in line, line
    assert snapshot(tmp_path) == before


def test_nonfinite_source_is_refused_naming_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    src, dst = _setup_bad(tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.up_proj.weight"
    shard = src / index["weight_map"][key]
    sd = load_file(shard)
    sd[key][0, 0] = float("nan")
    save_file(sd, shard, metadata={"format": "pt"})
    before = snapshot(tmp_path)
    line = one_line_error(cli("expand", "--src", src, "--dst-config", dst, "--out", tmp_path / "out"))
    assert shard.name in line and "non-finite" in line and snapshot(tmp_path) == before


def test_writer_takes_parts_in_any_order_and_refuses_to_finish_incomplete(tmp_path):
    """HFWriter: parts in reverse order give byte-identical shards to parts in order, which safetensors' own loader
    reads back as the logical tensors under transformers' names; a writer missing a part leaves nothing behind."""
    from safetensors.torch import load_file
    from tiny import random_sd, tiny_shape

    from neox_progressive.io.hf_writer import HFWriter

    shape = tiny_shape(num_kv_heads=2, num_layers=3)
    sd = random_sd(shape)
    parts = [("embed", None), *(("layer", i) for i in range(3)), ("final_norm", None), ("head", None)]

    def write(name, order, skip=None):
        with HFWriter(tmp_path / name, shape, torch.float32, max_shard_bytes=10_000) as w:
            for part, i in order:
                if (part, i) == skip:
                    continue
                prefix = f"layers.{i}." if part == "layer" else ""
                w.write_part(part, {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix or part)}, i)
        return tmp_path / name

    a, b = write("a", parts), write("b", parts[::-1])
    shards = sorted(p.name for p in a.glob("*.safetensors"))
    assert len(shards) > 2 and all((a / n).read_bytes() == (b / n).read_bytes() for n in shards)
    got = {k: v for n in shards for k, v in load_file(str(a / n)).items()}
    assert torch.equal(got["model.layers.2.self_attn.k_proj.weight"], sd["layers.2.attn.k.weight"])
    assert torch.equal(got["model.layers.0.mlp.gate_proj.weight"], sd["layers.0.mlp.gate.weight"])
    assert torch.equal(got["lm_head.weight"], sd["head.weight"]) and len(got) == 3 * 9 + 3
    index = json.loads((a / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in got.values())
    with pytest.raises(RuntimeError, match="incomplete"):
        write("c", parts, skip=("layer", 1))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".") or "tmp" in p.name) == ["a", "b"]


LOAD_438 = """
import json, sys, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32).eval()
with torch.no_grad():
    torch.save({"version": transformers.__version__, "logits": m(torch.tensor(json.loads(sys.argv[2]))).logits}, sys.argv[3])
"""


@pytest.mark.neox
@pytest.mark.parametrize("name, target, options", [
    ("llama-gqa", (8, 4, 64, 3), {}),
    ("llama-mha", (8, 8, 64, 3), {}),  # rope_theta 5000: 4.38 falls back to 10000 if the config only has rope_parameters
    ("gpt-neox-seq", (8, 8, 96, 3), dict(map_sampling="balanced")),  # rotary_pct 0.5: 4.38's default is 0.25
])
def test_fpi_output_loads_in_transformers_4_38(tmp_path, name, target, options):
    """NeoX's pinned transformers (4.38, in NeoX's virtualenv) loads the grown directory with the source's logits.

    The source is saved by the current transformers (5.x writes rope_parameters only); the output carries the 4.x
    keys as well, or 4.38 would load it without a word with the default rotary base and fraction."""
    import os
    import subprocess
    from pathlib import Path

    py = os.environ.get("NEOX_PYTHON") or (os.environ.get("NEOX_DIR") and
                                           Path(os.environ["NEOX_DIR"]).parent / "neox_venv" / "bin" / "python")
    if not py or not Path(py).exists():
        pytest.skip("NeoX's virtualenv (transformers 4.38) not found beside NEOX_DIR; set NEOX_PYTHON")
    model, src, out, _ = grow(tmp_path, name, {}, target, dict(method="fpi", new_layer_init="zero_out", **options),
                              max_shard_bytes=30_000)
    x = tokens()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(py), "-c", LOAD_438, str(out), json.dumps(x.tolist()), str(tmp_path / "l.pt")], check=True,
                   env=env, capture_output=True, text=True, timeout=300)
    got = torch.load(tmp_path / "l.pt", weights_only=True)
    assert got["version"].startswith("4.")
    assert rel_err(got["logits"].float(), hf_logits(model, x)) <= TOL


@pytest.mark.parametrize("name, target, options, want", [
    ("llama-mha", (8, 8, 64, 3), {}, {"rope_theta": 5000.0}),
    ("qwen2", (6, 3, 64, 3), {}, {"rope_theta": 20000.0}),
    ("gpt-neox-seq", (8, 8, 96, 3), dict(map_sampling="balanced"), {"rotary_pct": 0.5, "rotary_emb_base": 10000}),
])
def test_output_config_has_the_4x_rotary_keys_too(tmp_path, name, target, options, want):
    """Whatever the saving transformers wrote, the grown config.json also has the 4.x keys, with the source model's
    values (what transformers 4.38 reads; the NEOX_DIR test above loads it there)."""
    model, _, out, _ = grow(tmp_path, name, {}, target, dict(method="fpi", **options), given="yaml")
    cfg = json.loads((out / "config.json").read_text())
    for key, value in want.items():
        assert cfg[key] == value, key
    params = getattr(model.config, "rope_parameters", None)
    if params:  # saved by 5.x: the 5.x key stays and agrees
        assert cfg["rope_parameters"]["rope_theta"] == params["rope_theta"] == want.get("rope_theta",
                                                                                    want.get("rotary_emb_base"))


def test_a_neox_source_still_needs_its_config(tmp_path):
    (tmp_path / "ck").mkdir()
    before = snapshot(tmp_path)
    line = one_line_error(cli("expand", "--src", tmp_path / "ck", "--dst-config", tmp_path / "b.yml", "--out",
                              tmp_path / "out"))
    assert "--src-config is required" in line and snapshot(tmp_path) == before
