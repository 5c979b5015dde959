"""import-hf against transformers and DeepSpeed: an imported checkpoint, read back by CheckpointReader with the
written (or given) NeoX config, gives transformers' logits (fp32, relative error <= 1e-5) for every supported
architecture at TP 1 and 2, pipeline and sequential; DeepSpeed's PipelineModule loads it strictly."""

import json

import pytest
import torch
import yaml
from hf_import_util import build, hf_logits, ours, rel_err, save, tokens
from tiny import write_yaml

from neox_progressive.cli import main
from neox_progressive.config import ModelShape
from neox_progressive.errors import UserError
from neox_progressive.hf_import import import_hf
from neox_progressive.io.hf_reader import HFReader
from neox_progressive.io.reader import CheckpointReader, read_checkpoint
from neox_progressive.neox_args import validate_files

transformers = pytest.importorskip("transformers")

CASES = [  # (model, tp, checkpoint format)
    ("llama-mha", 1, "pipeline"), ("llama-mha", 2, "sequential"), ("llama-gqa", 2, "pipeline"),
    ("llama-gqa", 1, "sequential"), ("llama-tied", 2, "pipeline"), ("llama-bias", 2, "sequential"),
    ("qwen2", 1, "pipeline"), ("qwen2", 2, "sequential"), ("mistral", 2, "pipeline"),
    ("gpt-neox", 1, "sequential"), ("gpt-neox", 2, "pipeline"), ("gpt-neox-seq", 2, "sequential"),
]


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    names = sorted({c[0] for c in CASES})
    return {n: (build(n, seed=3), save(build(n, seed=3), root / n)) for n in names}


@pytest.mark.parametrize("name,tp,fmt", CASES)
def test_import_with_written_config_gives_transformers_logits(tmp_path, hf_dirs, name, tp, fmt):
    model, src = hf_dirs[name]
    yml, out = tmp_path / "member.yml", tmp_path / "ck"
    assert main(["import-hf", str(src), "--write-config", str(yml), "--out", str(out), "--tp", str(tp),
                 "--ckpt-format", fmt, "--quiet"]) == 0
    assert validate_files([yml]) == []
    cfg = yaml.safe_load(yml.read_text())
    assert cfg["model_parallel_size"] == tp and cfg["pipe_parallel_size"] == int(fmt == "pipeline")
    reader = CheckpointReader(out, ModelShape.from_yamls([yml]))
    assert reader.format == fmt and reader.tp == tp
    x = tokens(seed=1)
    want = hf_logits(model, x)
    assert want.std() > 0.5
    assert rel_err(ours(reader.shape, reader.state_dict(), x), want) <= 1e-5
    record = json.loads((out / "import.json").read_text())
    assert record["architecture"] == type(model).__name__ and (out / "global_step0" / "configs" / "member.yml").is_file()


def test_import_with_a_given_config_and_bf16(tmp_path, hf_dirs):
    model, src = hf_dirs["llama-gqa"]
    shape = HFReader(src).shape.replace(tp=2, pp=0)
    yml = write_yaml(tmp_path / "stage.yml", shape)
    import_hf(src, tmp_path / "ck", [yml], dtype="bf16")
    rshape, sd = read_checkpoint(tmp_path / "ck", [yml])
    assert sd["layers.0.attn.q.weight"].dtype == torch.bfloat16
    rounded = build("llama-gqa", seed=3)
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.bfloat16().float())  # transformers on the same bf16-rounded weights
    x = tokens(seed=2)
    assert rel_err(ours(rshape, sd, x), hf_logits(rounded, x)) <= 1e-5


@pytest.mark.parametrize("over,key", [({"num_kv_heads": 4}, "num_kv_heads"), ({"rotary_emb_base": 5000}, "rotary_emb_base"),
                                      ({"rms_norm_eps": 1e-8}, "rms_norm_epsilon"), ({"attn_bias": True},
                                                                                     "use_bias_in_attn_linear")])
def test_a_config_that_describes_another_model_is_refused(tmp_path, hf_dirs, over, key):
    _, src = hf_dirs["llama-gqa"]
    yml = write_yaml(tmp_path / "stage.yml", HFReader(src).shape.replace(**over))
    with pytest.raises(UserError, match=key):
        import_hf(src, tmp_path / "ck", [yml])
    assert not (tmp_path / "ck").exists()


def test_tp_flag_must_agree_with_the_config(tmp_path, hf_dirs):
    _, src = hf_dirs["llama-gqa"]
    yml = write_yaml(tmp_path / "stage.yml", HFReader(src).shape)
    with pytest.raises(UserError, match="--tp disagrees"):
        import_hf(src, tmp_path / "ck", [yml], tp=2)


def test_tokenizer_and_vocab_padding_in_the_written_config(tmp_path):
    """With a tokenizer smaller than the embedding, NeoX must pad it to exactly the HF rows at the chosen TP."""
    from hf_export_util import gpt2_files

    model = build("llama-gqa", vocab_size=352)
    src = save(model, tmp_path / "hf")
    gpt2_files(src, vocab_size=300)
    from neox_progressive.hf_import import member_config
    from neox_progressive.tokenizer import config_vocabulary

    cfg = member_config(src, tp=2)
    assert cfg["tokenizer_type"] == "GPT2BPETokenizer" and config_vocabulary(cfg).size == 300
    assert cfg["make_vocab_size_divisible_by"] == 176  # 300 -> 352 only with 176 x 2 (16 x 2 pads to 320)
    yml = tmp_path / "m.yml"
    import_hf(src, tmp_path / "ck", write_config=yml, tp=2)
    assert ModelShape.from_yamls([yml]).padded_vocab_size == 352


def test_a_config_whose_tokenizer_pads_to_other_rows_is_refused_with_the_padding_that_works(tmp_path):
    from hf_export_util import gpt2_files

    src = save(build("llama-gqa", vocab_size=352), tmp_path / "hf")
    vocab, merges = gpt2_files(tmp_path / "tok", vocab_size=300)
    shape = HFReader(src).shape.replace(padded_vocab_size=None, make_vocab_size_divisible_by=128)
    yml = write_yaml(tmp_path / "stage.yml", shape, tokenizer_type="GPT2BPETokenizer", vocab_file=str(vocab),
                     merge_file=str(merges))
    assert ModelShape.from_yamls([yml]).padded_vocab_size == 384
    want = "the padded vocab gives 384 but the HF model has 352.*make_vocab_size_divisible_by: 352"  # at TP 1
    with pytest.raises(UserError, match=want):
        import_hf(src, tmp_path / "ck", [yml])
    assert not (tmp_path / "ck").exists()


def test_dry_run_writes_nothing_and_json(tmp_path, hf_dirs, capsys):
    _, src = hf_dirs["llama-tied"]
    assert main(["import-hf", str(src), "--write-config", str(tmp_path / "m.yml"), "--out", str(tmp_path / "ck"),
                 "--dry-run", "--format", "json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["architecture"] == "LlamaForCausalLM" and any("copy of the embedding" in n for n in rec["notes"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.deepspeed
@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha", "qwen2", "gpt-neox"])
def test_deepspeed_pipeline_module_loads_the_import_strictly(tmp_path, hf_dirs, name):
    pytest.importorskip("deepspeed")
    from neox_pipe import build_pipe, ds_engine, ds_load, pipe_logits

    model, src = hf_dirs[name]
    yml = tmp_path / "m.yml"
    import_hf(src, tmp_path / "ck", write_config=yml)
    shape = CheckpointReader(tmp_path / "ck", ModelShape.from_yamls([yml])).shape  # vocab rows from the files
    pipe = build_pipe(shape, seed=9)
    x = tokens(seed=4)
    want = hf_logits(model, x)
    assert rel_err(pipe_logits(pipe, x), want) > 0.1  # random before loading
    ds_load(ds_engine(pipe), tmp_path / "ck")
    assert rel_err(pipe_logits(pipe, x), want) <= 1e-5
