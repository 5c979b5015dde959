"""Print the token budget of a model family: per member parameters, scratch and planned tokens, FLOPs,
cumulative FLOPs, global batch, train_iters, realized tokens, max LR and data windows; totals and the
saving vs training every member independently; and the readings of what the paper's text leaves open
that the family file chose (budget.keep: batch|updates, training.lr by: params|stage,
budget.fixed_data_order: epochs|shuffled).

Progressive mode uses the paper's Eq. 4 (Yano et al. 2025): member i gets the FLOPs of training it
from scratch minus what the members before it cost, so the family costs what the largest member
costs alone (App. B: 1/2/4/8B at 20 tokens/param -> 20/30/60/120B tokens, 24.7% saved).
Independent mode trains every member on its scratch budget. Writes nothing. In progressive mode every
expansion is planned from the shapes too, so a family that generate-configs and run refuse (a GQA
pair that cannot be grown, a head_dim that changes) is refused here as well.
"""

from __future__ import annotations

import json

from neox_progressive.family import load_family, plan_family
from neox_progressive.family.report import plan_json, plan_summary, plan_table, readings
from neox_progressive.family.spec import MODES
from neox_progressive.family.stages import check_expansions

HELP = "print a family's token budgets, FLOPs, iterations and LRs (paper Eq. 4)"
EXAMPLES = """
  neox-progressive plan configs/neox/paper_2x_chinchilla.yml
  neox-progressive plan configs/neox/paper_2x_chinchilla.yml --mode independent
  neox-progressive plan configs/neox/paper_2x_chinchilla_fixed_data_lr_scaled.yml
  neox-progressive plan configs/neox/tiny_family.yml --format json > plan.json
"""


def add_arguments(p) -> None:
    p.add_argument("family", metavar="FAMILY_YML", help="the family file (see configs/neox/README.md)")
    p.add_argument("--mode", choices=MODES, help="progressive (Eq. 4) or independent (every member from scratch); "
                   "default: the family file's mode")
    p.add_argument("--format", choices=["text", "json", "table"], default="text",
                   help="output format (default: text; `table` is its older name)")


def run(args) -> int:
    family = load_family(args.family)
    plan = plan_family(family, args.mode)
    if plan.mode == "progressive":  # what generate-configs and run refuse, plan refuses too
        check_expansions(family)
    if args.format == "json":
        print(json.dumps(plan_json(family, plan), indent=1))
        return 0
    print(f"family {family.name} ({plan.mode}), {len(plan.rows)} members, seq_length {plan.seq_length}, params: "
          + ("computed from the shapes (embedding and untied head included)" if plan.params_rule == "computed"
             else "nominal"))
    print("\n".join(plan_table(plan)))
    print("\n".join(plan_summary(plan)))
    for line in readings(family, plan):
        print(f"reading: {line}")
    return 0
