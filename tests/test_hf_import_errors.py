"""import-hf on bad input, through the CLI in a subprocess: one `error:` line naming the file or config.json key and
the fix, exit status 2 (a UserError), no traceback, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
from cli_util import cli, one_line_error, snapshot
from hf_import_util import build, save

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return save(build("llama-gqa"), tmp_path_factory.mktemp("hf") / "m", max_shard_size="20KB")


def refused(tmp_path, src, *extra) -> str:
    before = snapshot(tmp_path)
    res = cli("import-hf", src, "--write-config", "m.yml", "--out", "ck", "--quiet", *extra, cwd=tmp_path)
    msg = one_line_error(res, 2)
    assert snapshot(tmp_path) == before, "a refused import wrote something"
    return msg


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_config(path, **over):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(over)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_missing_shard(tmp_path, sharded):
    src = copy(sharded, tmp_path.parent / f"{tmp_path.name}-src")
    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.unlink()
    assert f"names {shard.name}, which does not exist" in refused(tmp_path, src)


def test_index_naming_a_missing_file(tmp_path, sharded):
    src = copy(sharded, tmp_path.parent / f"{tmp_path.name}-src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "names model-00099-of-00099.safetensors, which does not exist" in refused(tmp_path, src)


def test_shard_with_wrong_shapes(tmp_path, sharded):
    from safetensors.torch import load_file, save_file

    src = copy(sharded, tmp_path.parent / f"{tmp_path.name}-src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.down_proj.weight"
    path = src / index["weight_map"][key]
    tensors = load_file(str(path))
    save_file({**tensors, key: tensors[key][:, :40].contiguous()}, str(path), metadata={"format": "pt"})
    assert f"{key} has shape (32, 40) but config.json implies (32, 48)" in refused(tmp_path, src)


@pytest.mark.parametrize("over,needle", [
    ({"architectures": ["MixtralForCausalLM"], "num_local_experts": 8}, "architectures = [\"MixtralForCausalLM\"]: mixture"),
    ({"architectures": ["GemmaForCausalLM"]}, "architectures = [\"GemmaForCausalLM\"]: not a supported"),
    ({"rope_parameters": None, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.rope_type = \"llama3\""),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}, "rope_parameters.rope_type = \"yarn\""),
    ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 16}, "sliding_window = 16"),
])
def test_unrepresentable_config(tmp_path, sharded, over, needle):
    src = edit_config(copy(sharded, tmp_path.parent / f"{tmp_path.name}-src"), **over)
    msg = refused(tmp_path, src)
    assert needle in msg and "config.json" in msg


def test_destination_exists(tmp_path, sharded):
    (tmp_path / "ck").mkdir()
    assert "--force" in refused(tmp_path, sharded)


def test_no_config_given(tmp_path, sharded):
    before = snapshot(tmp_path)
    res = cli("import-hf", sharded, "--out", "ck", cwd=tmp_path)
    assert "--write-config" in one_line_error(res, 2) and snapshot(tmp_path) == before


def test_not_an_hf_directory(tmp_path):
    (tmp_path.parent / f"{tmp_path.name}-empty").mkdir()
    assert "config.json does not exist" in refused(tmp_path, tmp_path.parent / f"{tmp_path.name}-empty")
