"""The plan report: family_plan.json (for the runner and prepare-data), .md (for people), .png (Fig. 1/3 style)."""

from __future__ import annotations

import warnings
from pathlib import Path

from neox_progressive.family.budget import Plan
from neox_progressive.family.spec import Family


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g}{unit}"
    return f"{x:.4g}"


def plan_json(family: Family, plan: Plan) -> dict:
    """The plan as data, plus what the runner needs per member (stage file, dirs, expansion, eval)."""
    from neox_progressive.family.budget import member_dirs
    out = {"family": family.name, "family_file": family.path.name, "mode": plan.mode,
           "params_rule": plan.params_rule + (" (shape count: embedding and untied head included)"
                                              if plan.params_rule == "computed" else ""),
           "seq_length": plan.seq_length, "fixed_data_cap": plan.fixed_data_cap, "train_data": family.data.train,
           "valid_data": family.data.valid, "stream_tokens": plan.stream_tokens,
           "total_flops": plan.total_flops, "independent_flops": plan.independent_flops,
           "largest_scratch_flops": plan.largest_scratch_flops, "saving": plan.saving,
           "realized_flops": plan.realized_flops, "budget_keep": plan.keep, "fixed_data_order": plan.fixed_data_order,
           "lr_rule": _lr_rule(family), "readings": readings(family, plan),
           "expansion": family.expansion, "eval": family.eval, "members": []}
    for row in plan.rows:
        dirs = member_dirs(family, plan.mode, row.name)
        rec = {**row.__dict__, "stage_yaml": f"stage_{row.name}.yml", "save": str(dirs.checkpoints)}
        if rec["init"] is None:  # only a first member seeded from a Hugging Face model has one
            del rec["init"]
        if (plan.mode == "progressive" and row is not plan.rows[0]) or (row.init and row.init["train"]):
            rec["load"] = str(dirs.expanded)
        out["members"].append(rec)
    return out


def _lr_rule(family: Family) -> str:
    lr = family.training.lr
    return f"size_scaled by {lr.by}" if lr.rule == "size_scaled" else lr.rule


def readings(family: Family, plan: Plan) -> list[str]:
    """The choices the paper's text leaves open that this plan makes, one sentence each ("our reading")."""
    out = []
    first = plan.rows[0]
    if first.init:
        use = ("trained for its budget from the import" if first.init["train"] else
               f"not trained: this run spends {plan.total_flops - first.flops:.4g} of the plan's FLOPs")
        out.append(f"members[0].init: {first.name} starts from the Hugging Face model {first.init['hf']} (import-hf), "
                   f"{use}; Eq. 4 counts its scratch cost as spent (our choice), so the later budgets are the paper's.")
    if plan.mode == "progressive":
        out.append(
            f"budget.keep: {plan.keep} (our reading). App. A gives every size 40700 updates at a batch that doubles with "
            "the size, which fits the scratch budgets only; "
            + ("each progressive member keeps its global batch and trains fewer iterations (keep: updates would keep the "
               "scratch iteration count and shrink the batch)." if plan.keep == "batch" else
               "each progressive member keeps its scratch iteration count and trains a smaller global batch (keep: "
               "batch would keep the batch and train fewer iterations)."))
    if family.training.lr.rule == "size_scaled":
        other = "stage" if family.training.lr.by == "params" else "params"
        out.append(f"training.lr: size_scaled by {family.training.lr.by} (our reading of Section 4.4's \"linearly "
                   f"decreasing ... in accordance with the increase in model size\"; by: {other} is the other reading).")
    if plan.fixed_data_cap is not None:
        out.append(
            f"budget.fixed_data_order: {plan.fixed_data_order}. "
            + ("A window that wraps is read as the paper's Fig. 3 shows: the rest of the first epoch, then the second "
               "epoch (NeoX index maps written beside the window dataset)." if plan.fixed_data_order == "epochs" else
               "NeoX shuffles all samples of a window that wraps together: the repeated tokens are spread through the "
               "stage, not a trailing second epoch as in the paper's Fig. 3."))
    return out


def plan_table(plan: Plan) -> list[str]:
    """Markdown table lines, one row per member, and a totals row."""
    lines = ["| member | params | scratch tokens | tokens | FLOPs | cumulative FLOPs | batch | train_iters | "
             "realized tokens | max LR | data windows |", "|" + "---|" * 11]
    for r in plan.rows:
        wins = ", ".join(f"[{_si(a)}, {_si(b)})" for a, b in r.data_windows)
        name = r.name + (" (from HF" + (", trained)" if r.init["train"] else ")") if r.init else "")
        lines.append(f"| {name} | {_si(r.params)} | {_si(r.scratch_tokens)} | {_si(r.tokens)} | {r.flops:.4g} | "
                     f"{r.cumulative_flops:.4g} | {r.global_batch} | {r.train_iters} | {_si(r.realized_tokens)} | "
                     f"{r.max_lr:.3g} | {wins} |")
    total_tokens = sum(r.tokens for r in plan.rows)
    lines.append(f"| total | | | {_si(total_tokens)} | {plan.total_flops:.4g} | | | "
                 f"{sum(r.train_iters for r in plan.rows)} | {_si(sum(r.realized_tokens for r in plan.rows))} | | |")
    return lines


def plan_summary(plan: Plan) -> list[str]:
    return [f"mode {plan.mode}: {plan.total_flops:.4g} FLOPs in total; independent training of every member: "
            f"{plan.independent_flops:.4g}; the largest member from scratch: {plan.largest_scratch_flops:.4g}.",
            f"saving vs independent: {plan.saving:.1%} (1 - {plan.total_flops / plan.largest_scratch_flops:.4g} x largest / "
            f"{plan.independent_flops / plan.largest_scratch_flops:.4g} x largest).",
            f"realized in whole global batches: {plan.realized_flops:.4g} FLOPs "
            f"({plan.realized_flops / plan.total_flops - 1:+.3%} over the budget).",
            f"training data stream to prepare: {plan.stream_tokens:,} tokens"
            + (f" (fixed data: capped at {plan.fixed_data_cap:,}, later windows wrap)" if plan.fixed_data_cap else "") + "."]


def plan_markdown(family: Family, plan: Plan, independent: Plan) -> str:
    lines = [f"# Family plan: {family.name} ({plan.mode})", "",
             f"Generated from `{family.path.name}` by `neox-progressive generate-configs`. Parameters: "
             + ("computed from the shapes, embedding and untied output head included." if plan.params_rule == "computed"
                else "nominal sizes given in the family file.")
             + f" Sequence length {plan.seq_length}; FLOPs = 6 N D.", "", *plan_table(plan), "", *plan_summary(plan)]
    if readings(family, plan):
        lines += ["", "Readings the paper's text leaves open:", "", *(f"- {x}" for x in readings(family, plan))]
    if plan is not independent:
        lines += ["", "## Independent (every member from scratch), for comparison", "", *plan_table(independent)]
    return "\n".join(lines) + "\n"


def plan_png(family: Family, plan: Plan, independent: Plan, path: Path) -> Path | None:
    """Bar chart of FLOPs per member, progressive vs independent, with the cumulative cost; None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed: family_plan.png skipped (pip install matplotlib)", stacklevel=2)
        return None
    names = [r.name for r in plan.rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    x = range(len(names))
    other = independent if plan.mode == "progressive" else None
    ax1.bar([i - 0.2 for i in x], [r.flops for r in plan.rows], width=0.4, label=plan.mode)
    if other is not None and other is not plan:
        ax1.bar([i + 0.2 for i in x], [r.flops for r in other.rows], width=0.4, label="independent")
    ax1.set_xticks(list(x), names)
    ax1.set_ylabel("training FLOPs")
    ax1.set_title("FLOPs per member")
    ax1.legend()
    ax2.plot(names, [r.cumulative_flops for r in plan.rows], marker="o", label=plan.mode)
    if other is not None and other is not plan:
        ax2.plot(names, [r.cumulative_flops for r in other.rows], marker="s", label="independent")
    ax2.set_title("cumulative FLOPs")
    ax2.legend()
    fig.suptitle(f"{family.name}: saving {plan.saving:.1%} vs independent")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
