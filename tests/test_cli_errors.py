"""Bad input, as a new user gives it, through the real CLI: each case exits non-zero with one `error:` line naming
the file or key and the fix, writes nothing, and shows no traceback (issue 14: "Accepted silently", "A traceback
instead of a message", "Messages that mislead")."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from cli_util import cli, one_line_error, snapshot
from expand_util import shape, wider, write_source
from tiny import random_sd, write_yaml

from neox_progressive.io.reader import read_checkpoint
from neox_progressive.io.writer import write_checkpoint


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """A tiny fp32 source checkpoint with its config, a wider target config, and broken copies of the source."""
    root = tmp_path_factory.mktemp("ck")
    src = shape()
    src_dir, _, sd = write_source(root, src)
    write_yaml(root / "dst.yml", wider(src, 5, ffn=60))
    bad = dict(sd)
    bad["layers.1.attn.q.weight"] = sd["layers.1.attn.q.weight"].clone()
    bad["layers.1.attn.q.weight"][0, :3] = torch.tensor([math.nan, math.inf, math.nan])
    write_checkpoint(root / "nan", src, bad)
    shutil.copytree(src_dir, root / "mixed")
    layer = root / "mixed" / "global_step0" / "layer_03-model_00-model_states.pt"  # transformer layer 1
    torch.save({k: v.half() for k, v in torch.load(layer, weights_only=True).items()}, layer)
    write_checkpoint(root / "fp16", src, random_sd(src, seed=1), dtype=torch.float16)
    return root


def work(tmp_path: Path, ck: Path) -> Path:
    """A fresh dir holding links to the fixture's files (so that `snapshot` sees only what a command adds)."""
    for p in ck.iterdir():
        (tmp_path / p.name).symlink_to(p)
    return tmp_path


def refused(tmp_path: Path, *args, code: int = 2) -> str:
    """Run the CLI in `tmp_path`; assert exit status `code`, one error line, and nothing written there."""
    before = snapshot(tmp_path)
    res = cli(*args, cwd=tmp_path)
    msg = one_line_error(res, code)
    assert snapshot(tmp_path) == before, "a refused command wrote something"
    return msg


def expand_args(src="src", dst="dst.yml", out="out", src_config="src.yml", *extra):
    return ["expand", "--src", src, "--src-config", src_config, "--dst-config", dst, "--out", out, "--quiet", *extra]


# ---- accepted silently before ----------------------------------------------------------------------------------
def test_nonfinite_source_is_refused_by_expand_and_export(tmp_path, ck):
    d = work(tmp_path, ck)
    msg = refused(d, *expand_args(src="nan"))
    assert "layer_03-model_00-model_states.pt: attention.query_key_value.weight has 3 non-finite value(s) (NaN and Inf)" \
        in msg and "--allow-nonfinite" in msg
    msg = refused(d, "export-hf", "nan", "--config", "src.yml", "--out", "hf", "--no-tokenizer", "--quiet")
    assert "layer_03-model_00-model_states.pt: attention.query_key_value.weight has 3 non-finite" in msg


def test_allow_nonfinite_copies_them(tmp_path, ck):
    d = work(tmp_path, ck)
    res = cli(*expand_args(src="nan", out="out"), "--allow-nonfinite", cwd=d)
    assert res.returncode == 0, res.stderr
    _, sd = read_checkpoint(d / "out", [d / "dst.yml"])
    assert int((~torch.isfinite(sd["layers.1.attn.q.weight"])).sum()) >= 3


@pytest.mark.parametrize("line, expected", [
    ("hiden_size: 40", "dst.yml: unknown NeoX key 'hiden_size' (did you mean 'hidden_size'?)"),
    ("hidden_size: 40.5", "dst.yml: hidden_size: NeoX needs an integer, got 40.5"),
    ("hidden_size: sixty-four", "dst.yml: hidden_size: expected int, got str 'sixty-four'"),
    ("hidden_size: [40, 48]", "dst.yml: hidden_size: expected int, got list [40, 48]"),
    ("num_layers: two", "dst.yml: num_layers: expected int, got str 'two'"),
    ("train_iters: ten", "dst.yml: train_iters: expected int, got str 'ten'"),  # not a shape key: NeoX refuses it too
])
def test_config_typos_and_types_are_refused(tmp_path, ck, line, expected):
    d = work(tmp_path, ck)
    key = line.split(":")[0].replace("hiden", "hidden")
    text = [ln for ln in (ck / "dst.yml").read_text().splitlines() if not ln.startswith(key + ":")]
    (d / "dst.yml").unlink()
    (d / "dst.yml").write_text("\n".join([line, *text]) + "\n")
    msg = refused(d, *expand_args())
    assert expected in msg, msg


def test_patch_keys_are_known(tmp_path, ck):
    """Keys the plugin's NeoX patches add (eval_hook, ...) are accepted where configs are read."""
    d = work(tmp_path, ck)
    (d / "dst.yml").unlink()
    write_yaml(d / "dst.yml", wider(shape(), 5, ffn=60), eval_hook="neox_progressive.eval.neox_hook:kl", eval_tasks_limit=3)
    res = cli(*expand_args(), "--dry-run", cwd=d)
    assert res.returncode == 0, res.stderr


def test_a_changed_vocabulary_is_refused(tmp_path, ck):
    d = work(tmp_path, ck)
    tok = d / "tokenizer.json"
    tok.write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(512)}}}))
    (d / "dst.yml").unlink()
    write_yaml(d / "dst.yml", wider(shape(), 5, ffn=60), tokenizer_type="HFTokenizer", vocab_file=str(tok))
    msg = refused(d, *expand_args())
    assert "the target's tokenizer has 512 tokens, but the source checkpoint has 64 embedding rows" in msg


def test_the_same_vocabulary_repadded_for_another_tp_is_allowed(tmp_path, ck):
    d = work(tmp_path, ck)
    tok = d / "tokenizer.json"
    tok.write_text(json.dumps({"model": {"vocab": {f"t{i}": i for i in range(50)}}}))  # pads to the source's 64 rows
    (d / "dst.yml").unlink()
    write_yaml(d / "dst.yml", wider(shape(), 6, ffn=60, tp=2), tokenizer_type="HFTokenizer", vocab_file=str(tok),
               make_vocab_size_divisible_by=48)
    res = cli(*expand_args(), "--dry-run", "--format", "json", cwd=d)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["target"]["padded_vocab_size"] == 96  # 50 tokens padded to 48 x TP 2


# ---- tracebacks before ---------------------------------------------------------------------------------------------
def test_out_under_a_file_or_out_a_file(tmp_path, ck):
    d = work(tmp_path, ck)
    (d / "afile").write_text("x")
    msg = refused(d, *expand_args(out="afile/sub/out"))
    assert "afile is a file, so no directory can be created there" in msg
    msg = refused(d, *expand_args(out="afile"), "--force")
    assert "--out afile exists and is a file, not a directory" in msg
    msg = refused(d, "export-hf", "src", "--config", "src.yml", "--out", "afile/hf", "--no-tokenizer", "--quiet")
    assert "afile is a file" in msg


def test_binary_garbage_yaml_and_family_file(tmp_path, ck):
    d = work(tmp_path, ck)
    garbage = bytes(range(128, 256)) * 3
    (d / "garbage.yml").write_bytes(garbage)
    msg = refused(d, *expand_args(dst="garbage.yml"))
    assert "garbage.yml: not a text (UTF-8 YAML) file" in msg
    msg = refused(d, "plan", "garbage.yml")
    assert "garbage.yml: not a text (UTF-8 YAML) file" in msg


def test_mixed_dtype_layer_files_are_refused(tmp_path, ck):
    d = work(tmp_path, ck)
    msg = refused(d, *expand_args(src="mixed"))
    assert "layer_03-model_00-model_states.pt: input_layernorm.scale is float16 but the checkpoint's embedding is " \
           "float32" in msg
    msg = refused(d, "export-hf", "mixed", "--config", "src.yml", "--out", "hf", "--no-tokenizer", "--quiet")
    assert "is float16 but the checkpoint's embedding is float32" in msg


def test_a_pure_fp16_checkpoint_expands(tmp_path, ck):
    d = work(tmp_path, ck)
    res = cli(*expand_args(src="fp16"), cwd=d)
    assert res.returncode == 0, res.stderr
    _, sd = read_checkpoint(d / "out", [d / "dst.yml"])
    assert {v.dtype for v in sd.values()} == {torch.float16}


# ---- messages that misled before -------------------------------------------------------------------------------
def test_a_source_config_that_does_not_describe_the_checkpoint(tmp_path, ck):
    d = work(tmp_path, ck)
    (d / "src48.yml").write_text((ck / "src.yml").read_text().replace("hidden_size: 32", "hidden_size: 48"))
    msg = refused(d, *expand_args(src_config="src48.yml"))
    assert "word_embeddings.weight has shape (64, 32) but the config given for this checkpoint implies (64, 48)" in msg
    assert "head_dim" not in msg


def test_an_empty_latest_is_named(tmp_path, ck):
    d = tmp_path
    shutil.copytree(ck / "src", d / "src")
    (d / "src" / "latest").write_text("")
    for args in (["inspect", "src"], expand_args(src="src", src_config=str(ck / "src.yml"), dst=str(ck / "dst.yml"))):
        msg = refused(d, *args)
        assert "src/latest is empty; it should name the checkpoint's tag dir" in msg and "mp_rank" not in msg


@pytest.mark.parametrize("text, valid, expected", [
    ("", 0.0, "no text to tokenize (the input is empty or blank)"),
    ("\n  \n", 0.0, "no text to tokenize"),
    ("one single line of text\n", 0.9, "went to the validation data (--valid-fraction 0.9)"),
])
def test_prepare_data_on_an_empty_or_one_line_corpus(tmp_path, text, valid, expected):
    (tmp_path / "corpus.txt").write_text(text)
    msg = refused(tmp_path, "prepare-data", "corpus.txt", "--out", "data/c", "--vocab-size", "100",
                  "--valid-fraction", str(valid), "--quiet")
    assert expected in msg and "trainer_interface" not in msg


def test_prepare_data_on_a_binary_jsonl_input(tmp_path):
    (tmp_path / "corpus.jsonl").write_bytes(b'{"text": "fine"}\n' + bytes(range(128, 256)) * 4)
    msg = refused(tmp_path, "prepare-data", "corpus.jsonl", "--out", "data/c", "--vocab-size", "100", "--quiet")
    assert "corpus.jsonl: not UTF-8 text" in msg


def test_an_internal_error_asks_for_a_report_and_debug_shows_the_traceback(tmp_path, ck):
    d = work(tmp_path, ck)
    (d / "sitecustomize.py").write_text(  # a bug, planted: the reader fails with an error that is not the user's
        "import neox_progressive.io.reader as r\n"
        "def boom(*a, **k):\n    raise ZeroDivisionError('planted bug')\n"
        "r.CheckpointReader.__init__ = boom\n")
    env = dict(__import__("cli_util").ENV)
    env["PYTHONPATH"] = f"{d}:{env['PYTHONPATH']}"
    res = cli("inspect", "src", cwd=d, env=env)
    msg = one_line_error(res, 3)
    assert "internal error in neox-progressive" in msg and "ZeroDivisionError: planted bug" in msg
    assert "please report it" in msg and "neox-progressive --debug inspect src" in msg
    res = cli("--debug", "inspect", "src", cwd=d, env=env)
    assert res.returncode != 0 and "Traceback" in res.stderr and "ZeroDivisionError: planted bug" in res.stderr


def test_plan_refuses_what_generate_configs_and_run_refuse(tmp_path):
    from family_util import tiny_family

    fam = tiny_family()
    fam["members"][0]["num_kv_heads"] = 2  # 4 heads / 2 KV -> 6/3 with kv_fixed (KV heads kept): cannot be grown
    fam["members"][1]["num_kv_heads"] = 3
    fam["members"][2]["num_kv_heads"] = 4
    fam["expansion"] = {**fam.get("expansion", {}), "gqa_layout": "kv_fixed"}
    (tmp_path / "fam.yml").write_text(yaml.safe_dump(fam))
    for verb in (["plan", "fam.yml"], ["generate-configs", "fam.yml", "--out", "configs"]):
        msg = refused(tmp_path, *verb)
        assert "fam.yml: member m cannot be expanded from s" in msg, msg
    res = cli("plan", "fam.yml", "--mode", "independent", cwd=tmp_path)  # no expansion there: nothing to refuse
    assert res.returncode == 0, res.stderr
