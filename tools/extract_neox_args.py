#!/usr/bin/env python
"""Write neox_progressive/neox_args/neox_args.json: GPT-NeoX's config keys, types and defaults as data.

Reads megatron/neox_arguments/{neox_args,deepspeed_args}.py of a GPT-NeoX git checkout at one commit
(parsed with `ast`, never imported or copied) and records, per dataclass field: the class, the
type (int, float, str, bool, list, dict, Literal choices, Union members, Any) and the default when
it is a literal. These are facts about NeoX's interface; the validator
(neox_progressive/neox_args/validator.py) checks generated YAML against them.

    python tools/extract_neox_args.py /work/.mirror/EleutherAI+gpt-neox/repo ea7aefd8
"""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
from pathlib import Path

FILES = ("megatron/neox_arguments/neox_args.py", "megatron/neox_arguments/deepspeed_args.py")
OUT = Path(__file__).resolve().parents[1] / "neox_progressive" / "neox_args" / "neox_args.json"


def _type(node: ast.expr, consts: dict) -> dict:
    if isinstance(node, ast.Name):
        return {"kind": "any"} if node.id == "Any" else {"kind": node.id}
    if isinstance(node, ast.Constant) and node.value is None:
        return {"kind": "NoneType"}
    if isinstance(node, ast.Subscript):
        head = node.value.id if isinstance(node.value, ast.Name) else ast.unparse(node.value)
        args = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if head == "Literal":
            return {"kind": "literal", "choices": [ast.literal_eval(a) for a in args]}
        if head == "Optional":
            return {"kind": "union", "members": [_type(args[0], consts), {"kind": "NoneType"}]}
        if head == "Union":
            return {"kind": "union", "members": [_type(a, consts) for a in args]}
        return {"kind": "generic", "text": ast.unparse(node)}  # e.g. List[int]: NeoX compares type(value) to it
    return {"kind": "unknown", "text": ast.unparse(node)}


def _default(node: ast.expr | None):
    if node is None:
        return {"required": True}
    try:
        return {"default": ast.literal_eval(node)}
    except ValueError:
        return {"default_expr": ast.unparse(node)}


def extract(source: str, filename: str) -> dict:
    tree = ast.parse(source, filename)
    out = {}
    for cls in tree.body:
        if not isinstance(cls, ast.ClassDef):
            continue
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                out[stmt.target.id] = {"class": cls.name, "type": _type(stmt.annotation, {}), **_default(stmt.value)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("git_dir", help="a git directory or checkout of EleutherAI/gpt-neox")
    p.add_argument("commit", help="the commit to read, e.g. ea7aefd8; 'tree': the files of the directory as they are "
                   "(a checkout without git, e.g. $NEOX_DIR; the commit is then recorded as 'tree')")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    tree = a.commit == "tree"
    full = "tree" if tree else subprocess.check_output(["git", "-C", a.git_dir, "rev-parse", a.commit], text=True).strip()
    args: dict = {}
    for f in FILES:
        src = (Path(a.git_dir) / f).read_text() if tree else \
            subprocess.check_output(["git", "-C", a.git_dir, "show", f"{full}:{f}"], text=True)
        for name, rec in extract(src, f).items():
            if name in args:
                raise SystemExit(f"{name} defined twice ({args[name]['class']}, {rec['class']})")
            args[name] = rec
    data = {"source": {"repository": "EleutherAI/gpt-neox", "commit": full, "files": list(FILES),
                       "generated_by": "tools/extract_neox_args.py"},
            "args": dict(sorted(args.items()))}
    Path(a.out).write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    print(f"wrote {len(args)} NeoX arguments from {full[:8]} to {a.out}")


if __name__ == "__main__":
    main()
