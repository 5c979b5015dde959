"""`neox-progressive run --engine neox` for real (NEOX_DIR; GPT-NeoX on CPU through ../shared/neox_cpu):
a 2-member tiny family, NeoX trains both stages, the runner expands NeoX's checkpoint of member 1, and
member 2's first logged NeoX loss is the expanded checkpoint's loss computed by the reference model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from neox_run import family_cpu_keys, neox_dir, neox_python, shim_dir
from runner_util import prepare_tiny_data, write_family

from neox_progressive.data import MMapDataset
from neox_progressive.family import load_family
from neox_progressive.io.reader import CheckpointReader, read_checkpoint
from neox_progressive.model import Transformer
from neox_progressive.runner.engines import NeoXEngine
from neox_progressive.runner.family_run import FamilyRun
from neox_progressive.train import parse_neox_losses

pytestmark = [pytest.mark.neox, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]


def neox_sample(prefix: str, i: int) -> np.ndarray:
    """Training sample i as NeoX's GPT2Dataset builds it from its cached doc/sample/shuffle index files
    (one dataset, so the blend is the identity)."""
    ds = MMapDataset(prefix)
    name = Path(prefix).name
    idx_dir = Path(prefix).parent
    files = {k: sorted(idx_dir.glob(f"{name}_train_*_{k}_idx.npy")) for k in ("doc", "sample", "shuffle")}
    assert all(len(v) == 1 for v in files.values()), files
    doc_idx, sample_idx, shuffle_idx = (np.load(files[k][0], allow_pickle=False) for k in ("doc", "sample", "shuffle"))
    j = shuffle_idx[i]
    (df, of), (dl, ol) = sample_idx[j], sample_idx[j + 1]
    if df == dl:
        return np.asarray(ds[doc_idx[df]][of: ol + 1])
    parts = [np.asarray(ds[doc_idx[df]][of:])] + [np.asarray(ds[doc_idx[d]]) for d in range(df + 1, dl)]
    return np.concatenate(parts + [np.asarray(ds[doc_idx[dl]][: ol + 1])])


def run_family(tmp_path, neox: Path, training: dict | None = None, first_init: dict | None = None,
               **over) -> tuple[FamilyRun, dict]:
    """The tiny family's first two members, trained progressively by NeoX (CPU shim) through the runner."""
    data = prepare_tiny_data(tmp_path / "data")
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "neox_progressive" / "examples" / "tiny_family.yml").read_text())
    cpu = family_cpu_keys()
    members = raw["members"][:2]
    if first_init:
        members[0] = dict(members[0], init=first_init)
    fam_file = write_family(tmp_path / "family.yml", data, tmp_path / "out", members=members,
                            budget={"tokens_per_param": 0.5}, shared=cpu,
                            training={"log_interval": 1, "eval_interval": 1000, "checkpoint_interval": 1000,
                                      **(training or {})}, **over)
    family = load_family(fam_file)
    py = neox_python()
    # the repository on NeoX's path too: the eval hook imports neox_progressive inside NeoX
    env = {"NEOX_CPU_SHIM": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": f"{shim_dir()}{os.pathsep}{ROOT}",
           "WANDB_MODE": "offline", "TORCH_EXTENSIONS_DIR": str(Path(py).parent.parent / "ext"),
           "PATH": f"{Path(py).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = FamilyRun(family, "progressive", NeoXEngine(neox, python=py, env=env), quiet=True, device="cpu")
    return run, run.run()


def test_two_member_family_with_the_neox_engine(tmp_path):
    run, results = run_family(tmp_path, neox_dir())
    family = run.family
    for name in ("s", "m"):
        save = Path(results[f"{name}/train"]["checkpoint"])
        assert CheckpointReader(save, family.member(name).shape()).iteration > 0
    check = results["m/train"]["start_check"]
    log = (tmp_path / "out" / "progressive" / "logs" / "stage_m.neox.log").read_text()
    first = parse_neox_losses(log)[0]
    assert first[0] == 1 and check["first_losses"][0] == pytest.approx(first[1])
    # NeoX's first loss vs the reference model on the expanded checkpoint, on exactly NeoX's first batch
    # (rebuilt from the sample index files NeoX cached beside member m's window dataset)
    row = run.plan.row("m")
    batch = torch.from_numpy(np.stack([neox_sample(row.train_data_path, i) for i in range(row.global_batch)]).astype(np.int64))
    shape, sd = read_checkpoint(run.dirs("m").expanded, [run.stage_yaml("m")])
    with torch.no_grad():
        logits = Transformer.from_state_dict(shape, sd)(batch[:, :-1])
    ref = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
    assert abs(first[1] - ref) < 1e-3, (first, ref, check)
    print("NeoX first loss", first, "expanded (train window)", ref, "(held out)", check["expanded_loss"], "ln V", math.log(512))
    assert math.log(512) - first[1] > 1.0 and check["verdict"] == "expanded"


def first_batch(run: FamilyRun, name: str) -> torch.Tensor:
    row = run.plan.row(name)
    return torch.from_numpy(np.stack([neox_sample(row.train_data_path, i) for i in range(row.global_batch)])
                            .astype(np.int64))


def test_hf_seeded_first_member_trained_by_neox(tmp_path):
    """`init: {hf: DIR, train: true}` with the NeoX engine: the runner imports the HF model, NeoX trains member 1 from
    it (its first loss is transformers' loss of the HF model on NeoX's first batch), and member 2 grows from NeoX's
    checkpoint of member 1."""
    from test_family_hf_init import hf_member  # a LlamaForCausalLM of the tiny family's first member's shape

    model, hf_dir = hf_member(tmp_path / "hf")
    run, results = run_family(tmp_path, neox_dir(), first_init={"hf": str(hf_dir), "train": True})
    assert run.state.done("s/import") and results["s/train"]["start_check"]
    log = (tmp_path / "out" / "progressive" / "logs" / "stage_s.neox.log").read_text()
    first = parse_neox_losses(log)[0]
    batch = first_batch(run, "s")
    with torch.no_grad():
        logits = model(batch[:, :-1]).logits.float()
    want = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()))
    assert first[0] == 1 and abs(first[1] - want) < 1e-3, (first, want)
    save = Path(results["s/train"]["checkpoint"])
    assert CheckpointReader(save, run.family.member("s").shape()).iteration > 0
    m_check = results["m/train"]["start_check"]
    assert m_check["verdict"] == "expanded"
    expansion = json.loads((run.dirs("m").expanded / "expansion.json").read_text())
    assert Path(expansion["source_checkpoint"]) == save.resolve() or save.resolve() in Path(
        expansion["source_checkpoint"]).parents


def test_kl_to_the_previous_member_logged_by_a_patched_neox(tmp_path):
    """eval.neox_kl_hook through the runner: the generated stage of member 2 carries the hook (patch 0003), and a
    patched NeoX logs the KL to member 1 at every evaluation."""
    import shutil

    from neox_progressive.cli import main

    neox = tmp_path / "neox"
    shutil.copytree(neox_dir(), neox, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    assert main(["neox-patch", "--neox-dir", str(neox)]) == 0
    run, results = run_family(tmp_path, neox, training={"eval_interval": 10}, eval={"neox_kl_hook": True})
    log = (tmp_path / "out" / "progressive" / "logs" / "stage_m.neox.log").read_text()
    assert "kl_previous_member value:" in log
    rows = [json.loads(x) for x in (run.dirs("m").root / "kl_to_previous.jsonl").read_text().splitlines()]
    assert rows and rows[0]["iteration"] == 10 and all(r["kl_previous_member"] > 0 for r in rows)
    assert results["m/train"]["start_check"]["verdict"] == "expanded"
