"""Every generated stage YAML loads with GPT-NeoX's own NeoXArgs.from_ymls (NEOX_DIR), and NeoX derives
what the planner planned; NeoX refuses what our validator refuses."""

from __future__ import annotations

import pytest
import yaml
from family_neox import mock_config, neox_load
from family_util import CONFIGS
from neox_run import neox_dir

from neox_progressive.family import generate_configs, load_family, plan_family
from neox_progressive.neox_args import validate_files

pytestmark = pytest.mark.neox

FAMILIES = ["paper_2x_chinchilla", "paper_chinchilla", "paper_2x_chinchilla_lr_scaled", "tiny_family"]


def test_every_generated_stage_loads_in_neox(tmp_path):
    cases, expect = [], []
    for name in FAMILIES:
        fam = load_family(CONFIGS / f"{name}.yml")
        for mode in ("progressive", "independent"):
            out = tmp_path / name / mode
            generate_configs(fam, out, mode, plot=False)
            plan = plan_family(fam, mode)
            for row in plan.rows:
                stage = out / f"stage_{row.name}.yml"
                cases.append([stage, mock_config(tmp_path, row.num_gpus)])
                expect.append((stage, row, mode, fam))
    # the paper's 64-GPU stages with NeoX's 1-GPU mock: NeoX must stop on the batch triple
    wrong_gpus = [[tmp_path / "paper_2x_chinchilla" / "progressive" / "stage_1B.yml", mock_config(tmp_path, 1)]]
    results = neox_load(cases + wrong_gpus)
    for (stage, row, mode, fam), res in zip(expect, results):
        assert res["ok"], f"{stage}: {res['error']}\n{res['log']}"
        cfg = yaml.safe_load(stage.read_text())
        assert res["train_batch_size"] == row.global_batch
        assert res["gradient_accumulation_steps"] == row.gradient_accumulation_steps
        assert res["train_micro_batch_size_per_gpu"] == row.micro_batch
        assert res["train_iters"] == res["lr_decay_iters"] == row.train_iters
        assert res["lr"] == pytest.approx(row.max_lr) and res["min_lr"] == pytest.approx(row.min_lr)
        assert res["use_wandb"] is False and res["intermediate_size"] == cfg["intermediate_size"]
        assert res["train_data_paths"] == [row.train_data_path]
        assert bool(res["finetune"]) == (mode == "progressive" and row.name != fam.members[0].name)
    assert not results[-1]["ok"]
    assert "batch" in (results[-1]["error"] + results[-1]["log"]).lower()


def _write(tmp_path, name, cfg) -> str:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def test_neox_refuses_what_the_validator_refuses(tmp_path):
    fam = load_family(CONFIGS / "tiny_family.yml")
    generate_configs(fam, tmp_path / "cfg", plot=False)
    good = yaml.safe_load((tmp_path / "cfg" / "stage_s.yml").read_text())
    bad = {
        "unknown_key": {**good, "hiden_size": 32},
        "float_in_int": {**good, "train_iters": float(good["train_iters"])},
        "batch_triple": {**good, "train_batch_size": good["train_batch_size"] * 2},
        "bf16_no_zero": {k: v for k, v in {**good, "precision": "bfloat16"}.items() if k != "zero_optimization"},
        "string_float": {**good, "min_lr": "1e-5"},
    }
    mock = mock_config(tmp_path, 1)
    paths = {name: _write(tmp_path, name, cfg) for name, cfg in bad.items()}
    ours = {name: validate_files([p], num_gpus=1) for name, p in paths.items()}
    assert all(ours.values()), ours
    results = neox_load([[p, mock] for p in paths.values()] + [[tmp_path / "cfg" / "stage_s.yml", mock]])
    for name, res in zip(paths, results):
        assert not res["ok"], f"NeoX accepted {name}"
    assert results[-1]["ok"], results[-1]
    assert (neox_dir() / "configs" / "cpu_mock_config.yml").is_file()
