"""Write one complete GPT-NeoX config per family member, `stage_<name>.yml`, plus the plan report
(`family_plan.json`, `family_plan.md`, and `family_plan.png` when matplotlib is installed).

Each stage file runs alone: `python deepy.py train.py OUT/stage_8B.yml` from a NeoX checkout, or
`python -m neox_progressive.train OUT/stage_8B.yml` (the builtin engine). It holds the member's
shape, the explicit batch triple (NeoX stops on the wrong GPU count), train_iters and
lr_decay_iters from the token budget, the max LR, the member's data window, `save`, and for member
k > 1 of a progressive family `load` = its expanded checkpoint with `finetune: true`. Every file is
checked against NeoX's own argument names and types (commit ea7aefd8) before anything is written;
its header says what the paper leaves open (init, min LR, Adam eps, KV heads) and, with
`budget.keep: updates` or the fixed-data epoch order, what that changes for the stage. The index maps of
the epoch order are written with the data windows (`prepare-data --family`, `run`), not here.
"""

from __future__ import annotations

import json

from neox_progressive.errors import UserError
from neox_progressive.family import generate_configs, load_family, plan_family
from neox_progressive.family.spec import MODES

HELP = "write per-stage NeoX configs stage_<name>.yml and family_plan.{json,md,png}"
EXAMPLES = """
  neox-progressive generate-configs configs/neox/paper_2x_chinchilla.yml --out configs/neox --force   # the shipped default
  neox-progressive generate-configs configs/neox/paper_chinchilla.yml --out configs/neox/paper_chinchilla
  neox-progressive generate-configs family.yml --out runs/configs/independent --mode independent
  neox-progressive generate-configs family.yml --out cfg --dry-run --format json
"""


def add_arguments(p) -> None:
    p.add_argument("family", metavar="FAMILY_YML", help="the family file (see configs/neox/README.md)")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the stage files and the plan report")
    p.add_argument("--mode", choices=MODES, help="progressive or independent; default: the family file's mode")
    p.add_argument("--no-plot", action="store_true", help="do not write family_plan.png")
    p.add_argument("--force", action="store_true", help="replace existing files with other content")
    p.add_argument("--dry-run", action="store_true", help="check everything and list what would be written")
    p.add_argument("--format", choices=["text", "json"], default="text", help="how to list the files (default: text)")


def run(args) -> int:
    family = load_family(args.family)
    mode = args.mode or family.mode
    if args.dry_run:
        from neox_progressive.family.stages import dump_stage
        plan = plan_family(family, mode)
        for m in family.members:
            dump_stage(family, plan, m.name)  # generates and validates
        files = [f"{args.out}/stage_{m.name}.yml" for m in family.members]
        files += [f"{args.out}/family_plan.{ext}" for ext in ("json", "md", *(() if args.no_plot else ("png",)))]
    else:
        try:
            files = [str(p) for p in generate_configs(family, args.out, mode, force=args.force, plot=not args.no_plot)]
        except OSError as exc:
            raise UserError(f"cannot write to {args.out}: {exc.strerror}") from None
    if args.format == "json":
        print(json.dumps({"mode": mode, "dry_run": args.dry_run, "files": files}, indent=1))
    else:
        print(("would write" if args.dry_run else "wrote") + f" ({mode}):")
        for f in files:
            print(f"  {f}")
    return 0
