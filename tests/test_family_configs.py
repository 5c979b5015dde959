"""Stage configs: committed files are what generate-configs writes now, every stage is a complete NeoX
config that NeoX's rules accept, and it describes the member the planner planned."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import yaml
from family_util import CONFIGS, REPO, changed, paper_family, tiny_family, write_family

from neox_progressive.config import ModelShape
from neox_progressive.errors import UserError
from neox_progressive.family import generate_configs, load_family, member_dirs, plan_family
from neox_progressive.family.stages import dump_stage
from neox_progressive.neox_args import validate_files

# family file -> the folder of its committed stages: the default family's (2x Chinchilla, progressive) are
# configs/neox/stage_*.yml themselves, the variants' are in configs/neox/<family>/.
DEFAULT = CONFIGS / "paper_2x_chinchilla.yml"
COMMITTED = {DEFAULT: CONFIGS, **{p: CONFIGS / p.stem for p in sorted(CONFIGS.glob("*.yml")) if (CONFIGS / p.stem).is_dir()}}


def test_paper_family_stage_files_committed():
    assert {p.stem for p in COMMITTED} >= {"paper_2x_chinchilla", "paper_chinchilla", "paper_2x_chinchilla_lr_scaled",
                                           "paper_2x_chinchilla_fixed_data", "paper_2x_chinchilla_fixed_data_lr_scaled"}
    stages = ["stage_1B.yml", "stage_2B.yml", "stage_4B.yml", "stage_8B.yml"]
    assert sorted(p.name for p in CONFIGS.glob("stage_*.yml")) == stages   # `deepy.py train.py configs/neox/stage_8B.yml`
    assert not (CONFIGS / "paper_2x_chinchilla").exists()                  # one copy of the default family's stages
    for family_file, folder in COMMITTED.items():
        names = [f"stage_{m.name}.yml" for m in load_family(family_file).members]
        assert sorted(p.name for p in folder.glob("stage_*.yml")) == sorted(names), family_file
        if family_file.stem.startswith("paper_"):
            assert sorted(names) == stages, family_file


@pytest.mark.parametrize("family_file", list(COMMITTED), ids=lambda p: p.stem)
def test_committed_stage_files_are_current(family_file, tmp_path):
    fam = load_family(family_file)
    assert fam.mode == "progressive"
    generate_configs(fam, tmp_path, plot=False)
    folder = COMMITTED[family_file]
    for out in sorted(tmp_path.glob("*")):
        committed = folder / out.name
        assert committed.read_text() == out.read_text(), (
            f"{committed} is stale: run neox-progressive generate-configs {family_file.relative_to(REPO)} "
            f"--out {folder.relative_to(REPO)} --force")


def _stage(path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("mode", ["progressive", "independent"])
def test_stage_contents(tmp_path, mode):
    fam = load_family(write_family(tmp_path, paper_family(40, "computed")))
    plan = plan_family(fam, mode)
    generate_configs(fam, tmp_path / "cfg", mode, plot=False)
    for i, (member, row) in enumerate(zip(fam.members, plan.rows)):
        path = tmp_path / "cfg" / f"stage_{member.name}.yml"
        cfg = _stage(path)
        assert validate_files([path], num_gpus=64) == []
        assert cfg["train_batch_size"] == member.global_batch == (
            cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 64)
        assert cfg["train_iters"] == cfg["lr_decay_iters"] == math.ceil(row.tokens / (member.global_batch * 1024))
        assert cfg["optimizer"]["params"]["lr"] == row.max_lr and cfg["min_lr"] == row.min_lr
        assert cfg["precision"] == "bfloat16" and cfg["zero_optimization"]["stage"] == 1
        assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
        assert cfg["use_wandb"] is False and "no_load_optim" not in cfg
        dirs = member_dirs(fam, mode, member.name)
        assert cfg["save"] == str(dirs.checkpoints) and 1 <= cfg["checkpoint_factor"] <= cfg["train_iters"]
        if mode == "progressive" and i > 0:
            assert cfg["load"] == str(dirs.expanded) and cfg["finetune"] is True
        else:
            assert "load" not in cfg and "finetune" not in cfg
        assert cfg["train_data_paths"] == [row.train_data_path]
        assert cfg["valid_data_paths"] == cfg["test_data_paths"] == [fam.data.valid]
        # the stage describes the member: the checkpoint reader's view of the YAML is the member's shape
        read = ModelShape.from_yamls([path])
        want = member.shape()
        assert read == want.replace(padded_vocab_size=None, vocab_size=None, params_dtype="bfloat16")
        for key in ("rms_norm_epsilon", "min_lr", "warmup", "weight_decay"):
            assert isinstance(cfg[key], float), key
        assert isinstance(cfg["optimizer"]["params"]["eps"], float)
        body = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("#"))
        assert not re.findall(r"(?<![.\d])\d+[eE][-+]?\d+", body)  # no 1e-5: PyYAML would read a string


def test_floats_read_back_as_floats(tmp_path):
    data = changed(paper_family(), **{"training.lr": {"rule": "fixed", "max": 1.0e-4, "min": 1.0e-5}})
    data["training"]["eps"] = 1.0e-10
    fam = load_family(write_family(tmp_path, data))
    text = dump_stage(fam, plan_family(fam), "1B")
    cfg = yaml.safe_load(text)
    assert cfg["optimizer"]["params"]["lr"] == 1.0e-4 and cfg["min_lr"] == 1.0e-5
    assert cfg["optimizer"]["params"]["eps"] == 1.0e-10


def test_wandb_group_exact_and_shared_keys(tmp_path):
    data = changed(paper_family(), wandb={"enabled": True, "project": "p", "group": "my group", "team": "t"},
                   shared={"checkpoint_activations": True, "vocab_file": "tok/vocab.json"})
    fam = load_family(write_family(tmp_path, data))
    cfg = yaml.safe_load(dump_stage(fam, plan_family(fam), "4B"))
    assert cfg["use_wandb"] is True and cfg["wandb_group"] == "my group" and cfg["wandb_project"] == "p"
    assert cfg["wandb_team"] == "t" and cfg["wandb_run_name"].endswith("4B")
    assert cfg["checkpoint_activations"] is True
    assert cfg["vocab_file"] == str((tmp_path / "tok" / "vocab.json").resolve())


def test_generate_refuses_changed_files_without_force(tmp_path):
    path = write_family(tmp_path, paper_family())
    generate_configs(load_family(path), tmp_path / "cfg", plot=False)
    generate_configs(load_family(path), tmp_path / "cfg", force=False, plot=False)  # same content: fine
    other = load_family(path, {"training": {"lr": {"max": 1.0e-4}}})
    with pytest.raises(UserError, match="--force"):
        generate_configs(other, tmp_path / "cfg", force=False, plot=False)


def test_plot_optional(tmp_path, monkeypatch):
    fam = load_family(write_family(tmp_path, paper_family()))
    pytest.importorskip("matplotlib")
    written = generate_configs(fam, tmp_path / "a")
    assert (tmp_path / "a" / "family_plan.png").stat().st_size > 1000 and tmp_path / "a" / "family_plan.png" in written
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.warns(UserWarning, match="matplotlib"):
        written = generate_configs(fam, tmp_path / "b")
    assert not (tmp_path / "b" / "family_plan.png").exists()
    plan = json.loads((tmp_path / "b" / "family_plan.json").read_text())
    assert [m["name"] for m in plan["members"]] == ["1B", "2B", "4B", "8B"]
    assert plan["members"][1]["load"].endswith("progressive/2B/expanded") and "load" not in plan["members"][0]
    assert "| 8B |" in (tmp_path / "b" / "family_plan.md").read_text()


def _cli(capsys, *args):
    from neox_progressive.cli import main
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # --help
        rc = exc.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_plan_and_generate(tmp_path, capsys):
    rc, out, err = _cli(capsys, "plan", CONFIGS / "paper_2x_chinchilla.yml", "--format", "json")
    assert rc == 0, err
    plan = json.loads(out)
    assert [m["tokens"] for m in plan["members"]] == [40 * 10**9, 60 * 10**9, 120 * 10**9, 240 * 10**9]
    rc, out, _ = _cli(capsys, "plan", CONFIGS / "paper_chinchilla.yml", "--mode", "independent")
    assert rc == 0 and "| 8B |" in out
    rc, out, _ = _cli(capsys, "generate-configs", CONFIGS / "tiny_family.yml", "--out", tmp_path / "cfg", "--dry-run",
                      "--format", "json")
    assert rc == 0 and not (tmp_path / "cfg").exists()
    assert json.loads(out)["files"][0].endswith("stage_s.yml")
    for verb in ("plan", "generate-configs"):
        rc, out, _ = _cli(capsys, verb, "--help")
        assert rc == 0 and "examples:" in out and "configs/neox/" in out
    bad = write_family(tmp_path, changed(paper_family(), **{"budget.tokens_per_parm": 20}))
    rc, _, err = _cli(capsys, "plan", bad)
    assert rc == 2 and err.count("\n") == 1 and "did you mean 'tokens_per_param'" in err


def test_cli_subprocess(tmp_path):
    """The installed entry point path: python -m neox_progressive generate-configs writes the files."""
    res = subprocess.run([sys.executable, "-m", "neox_progressive", "generate-configs", str(CONFIGS / "tiny_family.yml"),
                          "--out", str(tmp_path / "cfg"), "--no-plot"], capture_output=True, text=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "cfg").iterdir()) == [
        "family_plan.json", "family_plan.md", "stage_l.yml", "stage_m.yml", "stage_s.yml"]


def test_tiny_family_stage_files(tmp_path):
    fam = load_family(write_family(tmp_path, tiny_family()))
    paths = generate_configs(fam, tmp_path / "cfg", plot=False)
    for p in paths:
        if p.name.startswith("stage_"):
            assert validate_files([p], num_gpus=1) == []
            cfg = _stage(p)
            assert cfg["precision"] == "fp32" and "data_types" not in cfg


def test_neox_exact_group_writes_the_patch_key(tmp_path):
    """wandb.neox_exact_group adds `wandb_group_exact: true` (patch 0004) to every stage; the validator knows the
    patches' keys; without the option the key is absent (an unpatched NeoX would refuse it)."""
    import yaml as _yaml

    from neox_progressive.family import generate_configs, load_family
    from neox_progressive.neox_args import validate_files

    fam_path = CONFIGS / "tiny_family.yml"
    for exact in (False, True):
        fam = load_family(fam_path, {"wandb": {"enabled": True, "group": "g", "neox_exact_group": exact}})
        out = tmp_path / str(exact)
        stages = [p for p in generate_configs(fam, out, plot=False) if p.name.startswith("stage_")]
        for p in stages:
            cfg = _yaml.safe_load(p.read_text())
            assert cfg["wandb_group"] == "g" and cfg.get("wandb_group_exact", False) is exact
            assert validate_files([p], num_gpus=1) == []


def test_neox_kl_hook_points_each_later_stage_at_the_previous_member(tmp_path):
    """eval.neox_kl_hook: stage k > 1 calls the KL hook (patch 0003) with member k-1's save dir and stage YAML."""
    import yaml as _yaml

    from neox_progressive.family import generate_configs, load_family, member_dirs

    fam = load_family(CONFIGS / "tiny_family.yml", {"eval": {"neox_kl_hook": True}, "output_dir": str(tmp_path / "runs")})
    generate_configs(fam, tmp_path / "cfg", "progressive", plot=False)
    first = _yaml.safe_load((tmp_path / "cfg" / "stage_s.yml").read_text())
    assert "eval_hook" not in first
    for prev, name in (("s", "m"), ("m", "l")):
        cfg = _yaml.safe_load((tmp_path / "cfg" / f"stage_{name}.yml").read_text())
        assert cfg["eval_hook"] == "neox_progressive.eval.neox_hook:kl_to_previous"
        args = cfg["eval_hook_args"]
        assert args["previous_checkpoint"] == str(member_dirs(fam, "progressive", prev).checkpoints)
        assert args["previous_config"] == [str((tmp_path / "cfg" / f"stage_{prev}.yml").resolve())]
        assert args["data_path"] == str(fam.data.valid)


def test_stage_headers_name_our_choices_and_readings(tmp_path):
    """What the paper leaves open is said in the generated files: init, min LR, Adam eps, KV heads (MHA), and the
    batch a `keep: updates` member trains with; the stage trains what the plan says."""
    data = changed(paper_family(40), **{"budget.keep": "updates"})
    fam = load_family(write_family(tmp_path, data))
    plan = plan_family(fam)
    text = dump_stage(fam, plan, "2B")
    header = "\n".join(x for x in text.splitlines() if x.startswith("#"))
    assert "Not stated by the paper (our choices): init small_init / wang_init, min LR 3e-05, Adam eps 1e-08, " \
           "20 KV heads of 20 (MHA)" in header
    assert "Global batch 1472, not the member's 1920: budget.keep: updates" in header
    cfg = yaml.safe_load(text)
    assert cfg["train_batch_size"] == plan.row("2B").global_batch == 1472
    assert cfg["train_micro_batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 64 == 1472
    assert cfg["train_iters"] == plan.row("2B").train_iters <= plan.row("2B").scratch_iters
    assert "Global batch" not in dump_stage(fam, plan, "1B")
    for path in (CONFIGS / "stage_8B.yml", CONFIGS / "paper_2x_chinchilla_fixed_data_lr_scaled" / "stage_8B.yml"):
        assert "(our choices): init small_init / wang_init" in path.read_text()
    assert "the rest of the first epoch, then the second epoch" in (
        CONFIGS / "paper_2x_chinchilla_fixed_data_lr_scaled" / "stage_8B.yml").read_text()


def test_cli_plan_prints_the_readings(capsys):
    rc, out, _ = _cli(capsys, "plan", CONFIGS / "paper_2x_chinchilla_fixed_data_lr_scaled.yml")
    assert rc == 0
    lines = [x for x in out.splitlines() if x.startswith("reading: ")]
    assert [x.split(".")[0].split(":")[1].strip() for x in lines] == ["budget", "training", "budget"]
    assert "budget.keep: batch (our reading)" in lines[0] and "size_scaled by params (our reading" in lines[1]
    assert "budget.fixed_data_order: epochs" in lines[2]
    rc, out, _ = _cli(capsys, "plan", CONFIGS / "paper_2x_chinchilla.yml", "--format", "json")
    plan = json.loads(out)
    assert (plan["budget_keep"], plan["lr_rule"], plan["fixed_data_order"]) == ("batch", "fixed", None)
    assert len(plan["readings"]) == 1 and plan["members"][1]["scratch_iters"] == 40691
    rc, out, _ = _cli(capsys, "plan", CONFIGS / "paper_2x_chinchilla.yml", "--mode", "independent")
    assert "reading: " not in out   # independent members train their scratch budgets: nothing to choose
