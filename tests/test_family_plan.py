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
    assert all(r.train_data_path.endswith(f".{fam.name}.independent.{r.name}") for r in ind.rows[1:])
    # the first member's window is the same in both modes: one dataset, the progressive one
    assert ind.rows[0].data_windows == plan.rows[0].data_windows
    assert ind.rows[0].train_data_path == plan.rows[0].train_data_path
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


def test_keep_batch_or_updates(tmp_path):
    """budget.keep (our reading of App. A): `batch` keeps each member's global batch; `updates` keeps the scratch run's
    iteration count and shrinks the batch to the smallest multiple of data-parallel 64 that reaches the budget."""
    seq, dp = 1024, 64
    batch_plan = plan_family(load_family(write_family(tmp_path, paper_family(40))), "progressive")
    fam = load_family(write_family(tmp_path, changed(paper_family(40), **{"budget.keep": "updates"}), "u.yml"))
    plan = plan_family(fam, "progressive")
    assert (batch_plan.keep, plan.keep) == ("batch", "updates")
    assert [r.global_batch for r in batch_plan.rows] == [960, 1920, 3840, 7680]
    for r, b in zip(plan.rows, (v[-1] for v in APP_A.values())):
        assert r.scratch_iters == math.ceil(r.scratch_tokens / (b * seq))
        assert abs(r.scratch_iters - 40700) < 10                        # App. A: 40700 updates for every size
        assert r.train_iters <= r.scratch_iters and r.tokens <= r.realized_tokens < r.tokens + r.global_batch * seq
        if r.tokens == r.scratch_tokens:                                 # 1B: its scratch run, App. A's batch
            assert r.global_batch == b
            continue
        assert r.global_batch % dp == 0 and r.global_batch < b
        assert (r.global_batch - dp) * r.scratch_iters * seq < r.tokens <= r.global_batch * r.scratch_iters * seq
        per_gpu = r.global_batch // dp
        assert r.micro_batch * r.gradient_accumulation_steps == per_gpu and r.micro_batch <= 5
        assert all(per_gpu % m for m in range(r.micro_batch + 1, 6))      # the largest micro batch that divides
    # 60B / (40691 x 1024) = 1439.97 sequences -> 23 x 64; 120B -> 2879.9 -> 45 x 64; 240B -> 5759.9 -> 90 x 64
    assert [r.global_batch for r in plan.rows] == [960, 23 * 64, 45 * 64, 90 * 64]
    assert [(r.micro_batch, r.gradient_accumulation_steps) for r in plan.rows[1:]] == [(1, 23), (5, 9), (5, 18)]
    # independent members train their scratch budgets: nothing to keep, the same plan either way
    assert [r.global_batch for r in plan_family(fam, "independent").rows] == [960, 1920, 3840, 7680]
    # a first member is its own scratch run, batch kept, even where a smaller batch would reach its tokens in its
    # updates (2670 tokens: 6 updates of 8 x 64; 7 x 64 x 6 would do)
    tiny = changed(tiny_family(), **{"budget.keep": "updates", "budget.tokens_per_param": 0.05, "training.lr.warmup": 0.0})
    first = plan_family(load_family(write_family(tmp_path, tiny, "t.yml"))).rows[0]
    assert (first.tokens, first.scratch_iters, first.global_batch, first.train_iters) == (2671, 6, 8, 6)


def test_lr_size_scaled_by_stage(tmp_path):
    lr = {"rule": "size_scaled", "smallest": 6.0e-4, "largest": 3.0e-4}
    by_stage = load_family(write_family(tmp_path, changed(paper_family(40), **{"training.lr": {**lr, "by": "stage"}})))
    assert max_lrs(by_stage) == pytest.approx([6.0e-4, 5.0e-4, 4.0e-4, 3.0e-4], rel=1e-9)   # a third of the way each
    by_params = load_family(write_family(tmp_path, changed(paper_family(40), **{"training.lr": lr}), "p.yml"))
    assert by_params.training.lr.by == "params"   # the default: linear in N (2B at 1/7 of the way, 4B at 3/7)
    assert max_lrs(by_params)[1] == pytest.approx(6.0e-4 - 3.0e-4 / 7, rel=1e-5)


def test_fixed_data_order_epochs_segments(tmp_path):
    """`epochs`: the wrapping member's samples split at the end of its first window (the rest of the first epoch)."""
    fam = load_family(write_family(tmp_path, changed(paper_family(40), **{"budget.fixed_data": True})))
    plan = plan_family(fam)
    assert plan.fixed_data_order == "epochs" and [r.sample_order is None for r in plan.rows] == [True, True, True, False]
    order, row = plan.rows[-1].sample_order, plan.rows[-1]
    first = row.data_windows[0][1] - row.data_windows[0][0]
    n = (row.window_tokens - 1) // 1024
    assert order["num_samples"] == n == math.ceil(row.train_iters * row.global_batch * 1.005)
    (a, end), (b, last) = order["segments"]
    assert (a, b, last) == (0, end, n) and order["seed"] == 1234 and order["seq_length"] == 1024
    # sample j covers tokens [1024 j, 1024 j + 1024]: the last sample of segment 1 ends inside the first window,
    # the first sample of segment 2 does not
    assert (end - 1) * 1024 + 1024 <= first - 1 < end * 1024 + 1024
    shuffled = plan_family(load_family(write_family(tmp_path, changed(
        paper_family(40), **{"budget.fixed_data": True, "budget.fixed_data_order": "shuffled"}), "s.yml")))
    assert all(r.sample_order is None for r in shuffled.rows) and shuffled.fixed_data_order == "shuffled"
    assert plan_family(fam, "independent").fixed_data_order is None
