"""The family planner: App. B budgets exactly, parameter counts vs the reference model, realized tokens,
LR rules, data windows, directories."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from family_util import APP_A, changed, paper_family, tiny_family, write_family

from neox_progressive.data import neox_window_tokens
from neox_progressive.family import load_family, max_lrs, member_dirs, plan_family, token_budgets
from neox_progressive.model import Transformer

B = 10**9


@pytest.mark.parametrize("tpp, scratch, progressive", [
    (20, [20, 40, 80, 160], [20, 30, 60, 120]),    # App. B Table 7 (Chinchilla)
    (40, [40, 80, 160, 320], [40, 60, 120, 240]),  # App. B Table 8 (2x Chinchilla)
])
def test_app_b_exact(tmp_path, tpp, scratch, progressive):
    fam = load_family(write_family(tmp_path, paper_family(tpp)))
    assert token_budgets(fam, "progressive") == [Fraction(x * B) for x in progressive]
    assert token_budgets(fam, "independent") == [Fraction(x * B) for x in scratch]
    plan = plan_family(fam, "progressive")
    assert [r.tokens for r in plan.rows] == [x * B for x in progressive]
    assert [r.scratch_tokens for r in plan.rows] == [x * B for x in scratch]
    # 1280 vs 1700 units (6 x 1B x 1B tokens) at 20 tokens/param; twice that at 40.
    unit = 6 * B * B * tpp / 20
    assert plan.total_flops == pytest.approx(1280 * unit, rel=1e-12)
    assert plan.independent_flops == pytest.approx(1700 * unit, rel=1e-12)
    assert plan.saving == pytest.approx(1 - 1280 / 1700, rel=1e-12)
    assert plan.total_flops == pytest.approx(plan.largest_scratch_flops, rel=1e-12)


def test_independent_is_scratch(tmp_path):
    fam = load_family(write_family(tmp_path, paper_family(20, "computed")))
    ind = plan_family(fam, "independent")
    assert [r.tokens for r in ind.rows] == [r.scratch_tokens for r in ind.rows]
    assert ind.saving == 0
    assert all(r.data_windows[0][0] == 0 for r in ind.rows)


def _meta_count(shape) -> int:
    with torch.device("meta"):
        model = Transformer(shape)
    return sum(p.numel() for p in model.parameters())


def test_computed_params_match_reference_model_and_eq4(tmp_path):
    """Budgets from App. A shapes (embedding and untied head included) against an independent count."""
    fam = load_family(write_family(tmp_path, paper_family(40, "computed")))
    counts = [_meta_count(m.shape()) for m in fam.members]
    plan = plan_family(fam, "progressive")
    assert [r.params for r in plan.rows] == counts
    assert counts[0] > 1.2e9  # the 1B shape is 1.3B with its 50304 x 2048 embedding and head
    # Eq. 4 recomputed here with plain floats from the reference counts.
    spent = 0.0
    for n, row in zip(counts, plan.rows):
        d = (n * 40 * n - spent) / n
        assert abs(row.tokens - d) <= 1 + 1e-9 * d
        spent += n * d
    # the whole family costs the largest member from scratch
    assert plan.total_flops == pytest.approx(6 * counts[-1] * 40 * counts[-1], rel=1e-12)


def test_realized_tokens_within_one_batch(tmp_path):
    data = paper_family(40, "computed")
    for i, b in enumerate((960, 1000, 1920 * 3, 7680)):
        data["members"][i]["global_batch"] = b
    data["training"]["micro_batch"] = 1
    data["training"]["num_gpus"] = 8
    for mode in ("progressive", "independent"):
        plan = plan_family(load_family(write_family(tmp_path, data)), mode)
        for r in plan.rows:
            batch_tokens = r.global_batch * 1024
            assert r.tokens <= r.realized_tokens < r.tokens + batch_tokens
            assert r.realized_tokens == r.train_iters * batch_tokens
            assert r.global_batch == r.micro_batch * r.gradient_accumulation_steps * r.num_gpus
        assert plan.total_flops <= plan.realized_flops < plan.total_flops + sum(6 * r.params * r.global_batch * 1024
                                                                                for r in plan.rows)


def test_lr_size_scaled_endpoints_and_line(tmp_path):
    data = changed(paper_family(40), **{"training.lr": {"rule": "size_scaled", "smallest": 6.0e-4, "largest": 2.0e-4}})
    fam = load_family(write_family(tmp_path, data))
    lrs = max_lrs(fam)
    assert lrs[0] == 6.0e-4 and lrs[-1] == 2.0e-4
    # nominal 1/2/4/8B: linear in N -> 2B at 1/7 of the way, 4B at 3/7
    assert lrs[1] == pytest.approx(6.0e-4 - 4.0e-4 / 7, rel=1e-5)
    assert lrs[2] == pytest.approx(6.0e-4 - 3 * 4.0e-4 / 7, rel=1e-5)
    plan = plan_family(fam)
    assert [r.max_lr for r in plan.rows] == lrs
    assert [r.min_lr for r in plan.rows] == pytest.approx([x / 10 for x in lrs])


def test_lr_fixed_and_per_member(tmp_path):
    fam = load_family(write_family(tmp_path, paper_family()))
    assert max_lrs(fam) == [3.0e-4] * 4
    data = changed(paper_family(), **{"training.lr": {"rule": "per_member", "min": 1.0e-5}})
    for m, lr in zip(data["members"], (4e-4, 3e-4, 2e-4, 1e-4)):
        m["max_lr"] = lr
    plan = plan_family(load_family(write_family(tmp_path, data)))
    assert [r.max_lr for r in plan.rows] == [4e-4, 3e-4, 2e-4, 1e-4]
    assert {r.min_lr for r in plan.rows} == {1.0e-5}


def test_data_windows_progressive_fixed_independent(tmp_path):
    fam = load_family(write_family(tmp_path, paper_family(40)))
    plan = plan_family(fam, "progressive")
    pos = 0
    for r in plan.rows:
        length = neox_window_tokens(r.train_iters, r.global_batch, 1024)
        assert r.window_tokens == length and r.data_windows == [[pos, pos + length]]
        assert length >= r.realized_tokens + 1
        assert r.train_data_path.endswith(f"data/train.{fam.name}.{r.name}")
        pos += length
    assert plan.stream_tokens == pos

    fixed = plan_family(load_family(write_family(tmp_path, changed(paper_family(40), **{"budget.fixed_data": True}))))
    cap = 320 * B
    assert fixed.fixed_data_cap == cap and fixed.stream_tokens == cap
    pos = 0
    for r in fixed.rows:
        assert sum(b - a for a, b in r.data_windows) == r.window_tokens
        assert r.data_windows[0][0] == pos % cap and all(0 <= a < b <= cap for a, b in r.data_windows)
        pos += r.window_tokens
    assert len(fixed.rows[-1].data_windows) == 2  # the 8B window wraps at 320B (paper Fig. 3 bottom)
    assert fixed.rows[-1].data_windows[1][0] == 0

    ind = plan_family(fam, "independent")
    assert [r.data_windows for r in ind.rows] == [[[0, r.window_tokens]] for r in ind.rows]
    assert all(r.train_data_path.endswith(f".{fam.name}.independent.{r.name}") for r in ind.rows)
    # the family name is in the window names: two families on one dataset never cut over each other
    other = plan_family(load_family(write_family(tmp_path, {**paper_family(40), "name": "other"}, "other.yml")), "progressive")
    assert not {r.train_data_path for r in other.rows} & {r.train_data_path for r in plan_family(fam, "progressive").rows}


def test_member_dirs_and_overrides(tmp_path):
    path = write_family(tmp_path, paper_family())
    fam = load_family(path)
    assert fam.output_dir == (tmp_path / "out").resolve()
    d = member_dirs(fam, "progressive", "2B")
    assert d.root == fam.output_dir / "progressive" / "2B"
    assert (d.expanded, d.checkpoints) == (d.root / "expanded", d.root / "checkpoints")
    fam2 = load_family(path, {"output_dir": str(tmp_path / "elsewhere"), "training": {"lr": {"max": 1.0e-4}}})
    assert fam2.output_dir == tmp_path / "elsewhere" and max_lrs(fam2) == [1.0e-4] * 4
    assert fam2.training.micro_batch == 5  # the rest of the block stays
    assert [m.name for m in fam.members] == list(APP_A)
    assert fam.member("8B").shape().ffn_size == 14336


def test_tiny_family_small_and_warmup_checked(tmp_path):
    plan = plan_family(load_family(write_family(tmp_path, tiny_family())))
    assert all(r.warmup_iters >= 1 for r in plan.rows)
    assert math.isclose(plan.total_flops, plan.largest_scratch_flops, rel_tol=1e-12)
