"""Every generated stage YAML loads with GPT-NeoX's own NeoXArgs.from_ymls (NEOX_DIR), and NeoX derives
what the planner planned; NeoX refuses what our validator refuses."""

from __future__ import annotations

import pytest
import yaml
from family_neox import mock_config, neox_load
from family_util import CONFIGS
from neox_run import neox_dir

from neox_progressive.config import ModelShape
from neox_progressive.family import generate_configs, load_family, plan_family
from neox_progressive.neox_args import validate_files

pytestmark = pytest.mark.neox

FAMILIES = ["paper_2x_chinchilla", "paper_chinchilla", "paper_2x_chinchilla_lr_scaled", "paper_2x_chinchilla_fixed_data",
            "paper_2x_chinchilla_fixed_data_lr_scaled", "tiny_family", "pythia_family"]
# the other readings the family file offers, on the default paper family
OPTIONS = {"keep_updates": ("paper_2x_chinchilla", {"budget": {"keep": "updates"}}),
           "lr_by_stage": ("paper_2x_chinchilla_lr_scaled", {"training": {"lr": {"by": "stage"}}}),
           "fixed_shuffled": ("paper_2x_chinchilla_fixed_data", {"budget": {"fixed_data_order": "shuffled"}})}


def test_every_generated_stage_loads_in_neox(tmp_path):
    cases, expect = [], []
    variants = [(name, name, None) for name in FAMILIES] + [(key, name, over) for key, (name, over) in OPTIONS.items()]
    assert set(FAMILIES) >= {p.stem for p in CONFIGS.glob("*.yml") if not p.stem.startswith("stage_")}  # every family file
    for label, name, over in variants:
        fam = load_family(CONFIGS / f"{name}.yml", over)
        for mode in ("progressive", "independent"):
            out = tmp_path / label / mode
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
        assert res["train_batch_size"] == res["train_micro_batch_size_per_gpu"] * res["gradient_accumulation_steps"] * (
            res["dp"])
        assert bool(res["finetune"]) == (mode == "progressive" and row.name != fam.members[0].name)
        # NeoX builds the architecture our reader reads from the same file (Llama shape or classic transformer)
        shape = ModelShape.from_yamls([stage])
        assert (res["norm"], res["activation"], res["pos_emb"]) == (shape.norm, shape.activation, shape.pos_emb)
        assert res["gpt_j_residual"] == shape.parallel_residual and res["rotary_pct"] == shape.rotary_pct
        assert (res["use_bias_in_attn_linear"], res["use_bias_in_mlp"]) == (shape.attn_bias, shape.mlp_bias)
        assert res[f"{'layernorm' if shape.norm == 'layernorm' else 'rms_norm'}_epsilon"] == shape.norm_eps
        assert bool(res["bias_gelu_fusion"]) == (shape.activation == "gelu" and shape.gelu_approx == "tanh")
        assert (shape.architecture == "neox") == (fam.name == "pythia_family")
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


@pytest.mark.slow
def test_tiny_family_first_stage_trains_in_neox(tmp_path):
    """Real NeoX (CPU shim) trains the generated stage 1 YAML; the CPU keys go into the one file via `shared`."""
    import math
    import re

    from neox_run import run_neox

    from neox_progressive.data import cut_member_windows
    from neox_progressive.io.reader import CheckpointReader

    fam = _cpu_tiny_family(tmp_path, eval_interval=10)
    first = plan_family(fam).rows[0]
    cut_member_windows(fam.data.train, [first.__dict__])
    log = run_neox("train.py", tmp_path / "cfg" / "stage_s.yml", log=tmp_path / "neox.log", timeout=900)
    iters = first.train_iters
    losses = [float(x) for x in re.findall(rf"iteration\s+\d+/\s*{iters} \|.*?lm_loss: ([0-9.E+-]+)", log)]
    valid = [float(x) for x in re.findall(r"validation results at iteration \d+ \| lm_loss value: ([0-9.E+-]+)", log)]
    assert re.search(rf"iteration\s+20/\s*{iters} \|", log) and losses[-1] < losses[0]
    assert max(valid) < math.log(512) - 0.5  # trained: well below a uniform guess over the vocabulary
    # NeoX builds the training samples (the first dataset it builds) from one epoch of the member's window
    assert re.findall(r"  number of epochs:\s+(\d+)", log)[0] == "1"
    assert re.findall(r"  total number of samples:\s+(\d+)", log)[0] == str(math.ceil(iters * 8 * 1.005))
    reader = CheckpointReader(tmp_path / "runs" / "progressive" / "s" / "checkpoints", fam.members[0].shape())
    assert reader.iteration == iters


def test_neox_args_data_matches_neox_itself():
    """neox_args.json (parsed from NeoX's source) against NeoX's live NeoXArgs dataclass."""
    from family_neox import neox_fields

    from neox_progressive.neox_args import known_args

    live, ours = neox_fields(), known_args()
    assert set(live) == set(ours)
    compared = 0
    for name, rec in ours.items():
        lt, ot = live[name]["type"], rec["type"]
        if ot["kind"] == "union":
            mine = ["Literal" if m["kind"] == "literal" else m.get("text", m["kind"]).split("[")[0] for m in ot["members"]]
            assert mine == [m.replace("typing.", "").split("[")[0] for m in lt["members"]], name
        else:
            assert lt == ot, name
        if "default" in rec:
            assert live[name]["default"] == rec["default"], name
            compared += 1
    assert compared > 300


@pytest.mark.slow
def test_second_stage_finetunes_from_its_expanded_dir_in_neox(tmp_path):
    """Stage k > 1 as generated (load = <member>/expanded, finetune: true) loads that checkpoint in real NeoX, trains
    from its weights (marked: final norm 3.0, where NeoX's own init would be 1.0) and saves to its checkpoints dir."""
    import re

    from neox_run import run_neox

    from neox_progressive.data import cut_member_windows
    from neox_progressive.family import member_dirs
    from neox_progressive.io.reader import CheckpointReader
    from neox_progressive.io.writer import write_checkpoint
    from neox_progressive.model import Transformer, init_weights

    fam = _cpu_tiny_family(tmp_path, eval_interval=1000)
    row = plan_family(fam).rows[1]
    cut_member_windows(fam.data.train, [row.__dict__])
    shape = fam.members[1].shape()
    start = {k: v.detach().clone() for k, v in init_weights(Transformer(shape), seed=3).state_dict().items()}
    start["final_norm.weight"].fill_(3.0)  # the expansion step's stand-in, marked
    write_checkpoint(member_dirs(fam, "progressive", "m").expanded, shape, start)
    log = run_neox("train.py", tmp_path / "cfg" / "stage_m.yml", log=tmp_path / "neox.log", timeout=900)
    assert "Unable to load checkpoint" not in log and "successfully loaded" in log
    assert re.search(rf"iteration\s+\d+/\s*{row.train_iters} \|", log)
    saved = member_dirs(fam, "progressive", "m").checkpoints
    assert (saved / "latest").read_text().strip() == f"global_step{row.train_iters}"
    trained = CheckpointReader(saved, shape).state_dict()
    norm = trained["final_norm.weight"].float()
    assert (norm - 3.0).abs().max() < 0.6  # trained from our weights (NeoX's init: 1.0)...
    assert float((trained["embed.weight"].float() - start["embed.weight"]).abs().max()) > 0  # ...and trained


def _cpu_tiny_family(tmp_path, eval_interval: int):
    """The tiny family on fresh stdlib data with NeoX's CPU keys merged into `shared` (one stage file each), its
    stage configs generated into tmp_path/cfg."""
    from neox_run import family_cpu_keys
    from train_util import make_data

    data = make_data(tmp_path / "data", n_chars=80_000, vocab=512)
    cpu = family_cpu_keys()
    fam = load_family(CONFIGS / "tiny_family.yml", {
        "output_dir": str(tmp_path / "runs"), "data": {"train": data["train"], "valid": data["valid"]},
        "shared": {"vocab_file": data["tokenizer"], **cpu}, "budget": {"tokens_per_param": 0.2},
        "training": {"lr": {"warmup": 0.1}, "eval_interval": eval_interval}})
    generate_configs(fam, tmp_path / "cfg", plot=False)
    return fam
