"""Token budgets, learning rates and data windows of a family: the plan (paper Sections 2-4, App. B).

Eq. 4: member i trains on D_i tokens with 6 N_i D_i = 6 N_i D_i^scratch - sum_{j<i} 6 N_j D_j, so the
whole progressive family costs 6 N_K D_K^scratch, what the largest member costs from scratch.
A first member seeded from a Hugging Face model (`init: {hf: DIR}`, our choice, issue 12) keeps its
scratch budget in the sum, counted as spent (someone trained it), so every later budget is the paper's;
it is not trained (`train: false`) or trained D_1 more tokens from the import (`train: true`). The
sum uses the budgets D_j, as the paper does (App. B: nominal 1/2/4/8B at 20 tokens/param give
20/30/60/120B tokens and 1280 instead of 1700 units). Budgets are exact fractions.

Each stage trains train_iters = ceil(D_i / (global batch x seq_length)) iterations, so its
realized tokens are at least the budget and less than one global batch more. Which of the two
shrinks for a progressive member (D_i < D_i^scratch) is `budget.keep`, our reading: App. A gives
every size 40700 updates at a batch that doubles with the size, which fits the scratch budgets
(40700 x 960 x 1024 = 40B for 1B ... x 7680 = 320B for 8B) and not Eq. 4's. `batch` (default) keeps
the member's global batch and trains fewer iterations; `updates` keeps its scratch iteration count
(ceil(D_i^scratch / (batch x seq))) and shrinks the global batch to the smallest multiple of the
data-parallel size that reaches D_i in that many updates (micro batch: the largest divisor of
batch / dp up to training.micro_batch), then trains ceil(D_i / (batch x seq)) <= those iterations.

Size-scaled max LR (Section 4.4): from the smallest member's value to the largest member's, linear
in the parameter count (`by: params`) or in the member's index (`by: stage`); both are readings of
"linearly decreasing ... in accordance with the increase in model size".

Data windows (see neox_progressive/data/windows.py): member k reads the window of the family's token
stream that follows the windows of members < k; each window is `neox_window_tokens(train_iters,
global_batch, seq_length)` long (NeoX asks for 0.5% more samples than it trains on), so the stream
advances by that length. With `fixed_data` the stream is capped at the largest member's scratch
tokens and a window that crosses the cap wraps to its start; `fixed_data_order: epochs` (the
paper's Fig. 3) makes such a member read the rest of the first epoch before the second (see
neox_progressive/data/sample_order.py), `shuffled` leaves NeoX's order. Independent mode: every
member starts at 0 and reads `<train prefix>.<family>.independent.<member>` (progressive:
`<train prefix>.<family>.<member>`), except the first member, whose window and budget are the same
in both modes: both read the progressive dataset (`run --mode both` trains it once).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

from neox_progressive.data.windows import neox_window_tokens
from neox_progressive.errors import UserError
from neox_progressive.family.spec import MODES, Family, MemberSpec


def member_params(family: Family, member: MemberSpec) -> float:
    """Parameters used for budgets: the member's shape count (embedding and untied head included),
    or its nominal size when the family says `budget.params: nominal`."""
    if family.budget.params == "nominal":
        return float(member.nominal_params)
    return float(member.shape().param_count(include_embeddings=True))


def _exact(x: float) -> Fraction:
    return Fraction(x).limit_denominator(10**6) if not float(x).is_integer() else Fraction(int(x))


def scratch_budgets(family: Family) -> list[Fraction]:
    """D_i^scratch: tokens_per_param x N_i, or the members' explicit scratch_tokens."""
    if family.budget.tokens_per_param is not None:
        tpp = _exact(family.budget.tokens_per_param)
        return [tpp * _exact(member_params(family, m)) for m in family.members]
    return [Fraction(m.scratch_tokens) for m in family.members]


def token_budgets(family: Family, mode: str) -> list[Fraction]:
    """D_i per member: Eq. 4 for progressive, D_i^scratch for independent."""
    scratch = scratch_budgets(family)
    if mode == "independent":
        return scratch
    params = [_exact(member_params(family, m)) for m in family.members]
    out: list[Fraction] = []
    for i, member in enumerate(family.members):
        spent = sum((params[j] * out[j] for j in range(i)), Fraction(0))
        d = (params[i] * scratch[i] - spent) / params[i]
        if d <= 0:
            raise UserError(
                f"{family.path}: member {member.name} gets an Eq. 4 budget of {float(d):.4g} tokens (<= 0): the members "
                f"before it already cost more than training it from scratch ({float(scratch[i]):.4g} tokens); give it "
                "more scratch tokens or drop a smaller member"
            )
        out.append(d)
    return out


def max_lrs(family: Family) -> list[float]:
    """Each member's max LR: fixed, per member, or size-scaled from smallest to largest (Section 4.4), linear in
    the parameter count (`by: params`) or in the member's index (`by: stage`)."""
    lr = family.training.lr
    if lr.rule == "fixed":
        return [lr.max] * len(family.members)
    if lr.rule == "per_member":
        return [m.max_lr for m in family.members]
    if len(family.members) == 1:
        return [lr.smallest]
    if lr.by == "stage":
        xs = [float(i) for i in range(len(family.members))]
    else:
        xs = [member_params(family, m) for m in family.members]
    lo, hi = xs[0], xs[-1]
    return [_round(lr.smallest + (x - lo) / (hi - lo) * (lr.largest - lr.smallest)) for x in xs]


def _round(x: float) -> float:
    """LRs to 6 significant digits, so the YAML says 3.0e-05, not 2.9999999999999997e-05."""
    return float(f"{x:.6g}")


@dataclass
class PlanRow:
    name: str
    params: float
    """Parameters used for the budget (see `member_params`)."""
    shape_params: int
    """Parameters of the shape (embedding and untied head included)."""
    scratch_tokens: int
    tokens: int
    """This mode's budget D_i (ceil of the exact value)."""
    flops: float
    """6 N D_i (budget)."""
    cumulative_flops: float
    train_iters: int
    scratch_iters: int
    """Iterations of the member's scratch budget at its configured global batch (App. A's "number of updates")."""
    realized_tokens: int
    realized_flops: float
    global_batch: int
    """The stage's global batch: the member's, or smaller with `budget.keep: updates`."""
    micro_batch: int
    gradient_accumulation_steps: int
    num_gpus: int
    max_lr: float
    min_lr: float
    warmup_iters: float
    data_windows: list[list[int]]
    train_data_path: str
    window_tokens: int
    init: dict | None = None
    """The first member's `init` ({hf: DIR, train: bool}): it starts from an imported Hugging Face model."""
    sample_order: dict | None = None
    """How NeoX must read the window dataset when it is not NeoX's own shuffle: {order: epochs, num_samples,
    seq_length, seed, allow_chopped, segments} (see neox_progressive.data.sample_order); None otherwise."""


@dataclass
class Plan:
    family: str
    mode: str
    seq_length: int
    params_rule: str
    fixed_data_cap: int | None
    keep: str = "batch"
    """budget.keep: what a progressive member keeps from its scratch run, its `batch` or its `updates`."""
    fixed_data_order: str | None = None
    """budget.fixed_data_order with a fixed-data cap (epochs | shuffled), else None."""
    rows: list[PlanRow] = field(default_factory=list)
    total_flops: float = 0.0
    independent_flops: float = 0.0
    """What training every member from scratch costs (6 N_i D_i^scratch summed)."""
    largest_scratch_flops: float = 0.0
    saving: float = 0.0
    """1 - total_flops / independent_flops."""
    realized_flops: float = 0.0
    """6 N x realized tokens summed: what the stages train (whole global batches, >= the budget)."""
    stream_tokens: int = 0
    """Tokens of the training stream the windows reach (data to prepare)."""

    def row(self, name: str) -> PlanRow:
        return next(r for r in self.rows if r.name == name)

    def to_dict(self) -> dict:
        return asdict(self)


def _dp(family: Family, member: MemberSpec) -> tuple[int, int]:
    """(GPUs, data-parallel size) of the member's stage."""
    gpus = member.num_gpus or family.training.num_gpus
    shape = member.shape()
    model_par = max(shape.pp, 1) * shape.tp
    if gpus % model_par:
        raise UserError(f"{family.path}: member {member.name}: {gpus} GPUs are not divisible by pipe x model parallel "
                        f"= {model_par}; choose num_gpus as a multiple of {model_par}")
    return gpus, gpus // model_par


def batch_triple(family: Family, member: MemberSpec, global_batch: int | None = None) -> tuple[int, int, int]:
    """(micro batch per GPU, gradient accumulation steps, GPUs) with global = micro x GAS x dp.

    `global_batch` other than the member's (`budget.keep: updates`) takes the largest micro batch up to the
    configured one that divides global / dp."""
    gpus, dp = _dp(family, member)
    micro = member.micro_batch or family.training.micro_batch
    if global_batch is not None and global_batch != member.global_batch:
        per_gpu = global_batch // dp
        micro = max(d for d in range(1, min(micro, per_gpu) + 1) if per_gpu % d == 0)
        return micro, per_gpu // micro, gpus
    if member.global_batch % (micro * dp):
        raise UserError(
            f"{family.path}: member {member.name}: global_batch {member.global_batch} is not micro_batch {micro} x "
            f"data-parallel {dp} x an integer; NeoX needs train_batch = micro x GAS x dp: change micro_batch or num_gpus")
    return micro, member.global_batch // (micro * dp), gpus


def stage_batch(family: Family, member: MemberSpec, tokens: int, scratch_tokens: int) -> int:
    """The stage's global batch: the member's, or with `budget.keep: updates` and fewer tokens than its scratch
    budget, the smallest multiple of the data-parallel size that trains `tokens` in the scratch iteration count."""
    seq = family.model.seq_length
    if family.budget.keep == "batch" or tokens >= scratch_tokens:
        return member.global_batch
    updates = math.ceil(scratch_tokens / (member.global_batch * seq))
    _, dp = _dp(family, member)
    return min(member.global_batch, math.ceil(tokens / (updates * seq * dp)) * dp)


def _windows(starts_at: int, length: int, cap: int | None) -> list[list[int]]:
    if cap is None:
        return [[starts_at, starts_at + length]]
    out, pos, left = [], starts_at % cap, length
    while left > 0:
        take = min(left, cap - pos)
        out.append([pos, pos + take])
        left -= take
        pos = (pos + take) % cap
    return out


def _train_data_path(family: Family, mode: str, member: MemberSpec, window: int) -> str:
    """`<train prefix>.<family>.<member>` (independent: `<train prefix>.<family>.independent.<member>`): families that
    share a training dataset cut their own windows side by side. The first member's window is the same in both modes
    (unless a fixed-data cap below it makes the progressive one wrap): then both modes read the progressive dataset."""
    base = f"{family.data.train}.{family.name}"
    if mode == "independent" and member.name == family.members[0].name:
        cap = math.ceil(scratch_budgets(family)[-1]) if family.budget.fixed_data else None
        if _windows(0, window, cap) == [[0, window]]:
            return f"{base}.{member.name}"
    return f"{base}.{member.name}" if mode == "progressive" else f"{base}.{mode}.{member.name}"


def _sample_order(family: Family, windows: list[list[int]], window: int) -> dict | None:
    """The paper's epoch order for a window that wraps (`fixed_data_order: epochs`), else None (NeoX's shuffle)."""
    if len(windows) < 2 or family.budget.fixed_data_order != "epochs":
        return None
    from neox_progressive.data.sample_order import segment_samples

    seq = family.model.seq_length
    num_samples = (window - 1) // seq
    return {"order": "epochs", "num_samples": num_samples, "seq_length": seq, "seed": family.training.seed,
            "allow_chopped": bool(family.shared.get("allow_chopped", True)),
            "segments": segment_samples([b - a for a, b in windows], seq, num_samples)}


def _row(family: Family, mode: str, member: MemberSpec, d_scratch: Fraction, d: Fraction, max_lr: float, start: int,
         cap: int | None) -> PlanRow:
    seq, lr = family.model.seq_length, family.training.lr
    n = member_params(family, member)
    tokens, scratch_tokens = math.ceil(d), math.ceil(d_scratch)
    batch = stage_batch(family, member, tokens, scratch_tokens)
    micro, gas, gpus = batch_triple(family, member, batch)
    iters = math.ceil(tokens / (batch * seq))
    window = neox_window_tokens(iters, batch, seq)
    warmup_iters = lr.warmup * iters
    if 0 < warmup_iters < 1:
        raise UserError(
            f"{family.path}: training.lr.warmup {lr.warmup} x {iters} iterations of member {member.name} = "
            f"{warmup_iters:.3g} warmup iterations (< 1): NeoX then starts at lr / {warmup_iters:.3g}, above the "
            f"max LR; use warmup >= {1 / iters:.3g} or 0")
    windows = _windows(start, window, cap)
    return PlanRow(
        name=member.name, params=n, shape_params=member.shape().param_count(), scratch_tokens=scratch_tokens,
        tokens=tokens, flops=6 * n * float(d), cumulative_flops=0.0, train_iters=iters,
        scratch_iters=math.ceil(scratch_tokens / (member.global_batch * seq)), realized_tokens=iters * batch * seq,
        realized_flops=6 * n * iters * batch * seq, global_batch=batch, micro_batch=micro, gradient_accumulation_steps=gas,
        num_gpus=gpus, max_lr=max_lr, min_lr=lr.min if lr.min is not None else _round(max_lr * lr.min_ratio),
        warmup_iters=warmup_iters, data_windows=windows, train_data_path=_train_data_path(family, mode, member, window),
        window_tokens=window, sample_order=_sample_order(family, windows, window),
        init={"hf": member.init_hf, "train": member.init_train} if member.init_hf else None)


def plan_family(family: Family, mode: str | None = None) -> Plan:
    """The budget table: one row per member, totals and saving vs independent training."""
    mode = mode or family.mode
    if mode not in MODES:
        raise UserError(f"mode {mode!r} is not one of {list(MODES)}")
    scratch, budgets, lrs = scratch_budgets(family), token_budgets(family, mode), max_lrs(family)
    cap = math.ceil(scratch[-1]) if family.budget.fixed_data and mode == "progressive" else None
    plan = Plan(family=family.name, mode=mode, seq_length=family.model.seq_length, params_rule=family.budget.params,
                fixed_data_cap=cap, keep=family.budget.keep,
                fixed_data_order=family.budget.fixed_data_order if cap is not None else None)
    cumulative, stream = 0.0, 0
    for member, d_scratch, d, max_lr in zip(family.members, scratch, budgets, lrs):
        row = _row(family, mode, member, d_scratch, d, max_lr, stream if mode == "progressive" else 0, cap)
        cumulative += row.flops
        row.cumulative_flops = cumulative
        plan.rows.append(row)
        stream = stream + row.window_tokens if mode == "progressive" else max(stream, row.window_tokens)
    params = [member_params(family, m) for m in family.members]
    plan.total_flops = cumulative
    plan.realized_flops = sum(r.realized_flops for r in plan.rows)
    plan.independent_flops = sum(6 * n * float(s) for n, s in zip(params, scratch))
    plan.largest_scratch_flops = 6 * params[-1] * float(scratch[-1])
    plan.saving = 1 - plan.total_flops / plan.independent_flops
    plan.stream_tokens = min(stream, cap) if cap is not None else stream
    return plan


@dataclass(frozen=True)
class MemberDirs:
    root: Path
    """<output_dir>/<mode>/<member>"""
    expanded: Path
    """The expanded init of the member (the stage's `load`; none for the first progressive member)."""
    checkpoints: Path
    """The stage's `save`."""


def member_dirs(family: Family, mode: str, member_name: str) -> MemberDirs:
    """One directory convention for everyone: `<output_dir>/<mode>/<member>/{expanded,checkpoints}`."""
    if mode not in MODES:
        raise UserError(f"mode {mode!r} is not one of {list(MODES)}")
    member = family.member(member_name)
    root = family.output_dir / mode / member.name
    return MemberDirs(root=root, expanded=root / "expanded", checkpoints=root / "checkpoints")
