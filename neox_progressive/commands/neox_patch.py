"""Apply, check or revert the plugin's patches to a GPT-NeoX checkout.

Four small patches, written against GPT-NeoX commit ea7aefd8 (patches/README.md explains each):

  0001-eval-tasks-limit   `eval_tasks_limit` (default 10, null = every document) instead of the
                          hardcoded limit=10 of the eval harness
  0002-eval-adapter-eot   an end-of-text id for Llama-style (SentencePiece / HF) tokenizers in the
                          eval adapter (None or <unk> today)
  0003-eval-hook          `eval_hook: "module:function"` + `eval_hook_args: {...}`: a plugin function
                          called at every evaluation during training; its metrics are logged with
                          the validation results (the plugin's hook logs the KL to the previous member)
  0004-wandb-group-exact  `wandb_group_exact: true` keeps `wandb_group` as configured (NeoX appends a
                          random id at every launch, splitting a family's stages into groups)

A git checkout is patched with `git apply`, any other tree with an exact applier (no fuzz). A
tree where a patch fits neither applied nor unapplied is refused, naming the file and hunk.
--check exits 0 only when every patch is applied.
"""

from __future__ import annotations

import json
import os

from neox_progressive import neox_patches as np_
from neox_progressive.errors import CheckFailed, UserError

HELP = "apply / check / revert the plugin's patches to a GPT-NeoX checkout"
EXAMPLES = """
  neox-progressive neox-patch --neox-dir ~/gpt-neox            # apply the patches not yet applied
  neox-progressive neox-patch --neox-dir ~/gpt-neox --check    # report; exit 1 unless all applied
  neox-progressive neox-patch --neox-dir ~/gpt-neox --revert   # back to upstream NeoX
"""


def add_arguments(p) -> None:
    p.add_argument("--neox-dir", default=os.environ.get("NEOX_DIR") or None,
                   help="the GPT-NeoX checkout (its root, with deepy.py); default: $NEOX_DIR")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="only report the state of each patch (exit 1 unless all applied)")
    mode.add_argument("--revert", action="store_true", help="revert the applied patches")
    p.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    p.add_argument("--format", choices=["text", "json"], default="text", help="output format of the report")


def run(args) -> int:
    if not args.neox_dir:
        raise UserError("no GPT-NeoX checkout: pass --neox-dir DIR (its root, with deepy.py) or set NEOX_DIR")
    neox = np_.check_neox_dir(args.neox_dir)
    patches = np_.load_patches()
    head = np_.git_head(neox)
    report = {"neox_dir": str(neox), "head": head, "patches_written_for": np_.NEOX_COMMIT, "patches": [], "changes": [],
              "dry_run": bool(args.dry_run)}
    say = (lambda line: None) if args.format == "json" else print
    if head and not head.startswith(np_.NEOX_COMMIT):
        say(f"note: {neox} is at commit {head[:8]}; the patches were written against {np_.NEOX_COMMIT}")
    states = {p.name: np_.state(neox, p) for p in patches}
    for p in patches:
        st, detail = states[p.name]
        report["patches"].append({"patch": p.title, "state": st, "detail": detail or None})
        say(f"{p.title:24s} {st}" + (f" ({detail})" if detail else ""))
    conflicts = [f"{name}: {detail}" for name, (st, detail) in states.items() if st == np_.CONFLICT]
    if conflicts:
        raise UserError(f"{neox} does not match the GPT-NeoX code the patches were written for (commit "
                        f"{np_.NEOX_COMMIT}): {conflicts[0]}; check out that commit or port the patch by hand")
    if args.check:
        if args.format == "json":
            print(json.dumps(report, indent=1))
        missing = [p.title for p in patches if states[p.name][0] != np_.APPLIED]
        if missing:
            raise CheckFailed(f"{len(missing)} patch(es) not applied in {neox} ({', '.join(missing)}); they apply "
                              f"cleanly: run `neox-progressive neox-patch --neox-dir {neox}`")
        return 0
    todo = [p for p in reversed(patches) if states[p.name][0] == np_.APPLIED] if args.revert else \
        [p for p in patches if states[p.name][0] == np_.NOT_APPLIED]
    verb = "revert" if args.revert else "apply"
    if not todo:
        say(f"nothing to {verb}")
    for p in todo:
        report["changes"].append({"patch": p.title, "action": verb, "files": [f.path for f in p.files]})
        if args.dry_run:
            say(f"would {verb} {p.title} ({', '.join(f.path for f in p.files)})")
            continue
        np_.change(neox, p, reverse=args.revert)
        say(f"{'reverted' if args.revert else 'applied':9s} {p.title}")
    if args.format == "json":
        print(json.dumps(report, indent=1))
    return 0
