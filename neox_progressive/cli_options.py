"""Command-line flags generated from an options dataclass: the dataclass is the one source of truth.

Each field becomes `--field-name` with the field's type, default and choices; its help is the
field's attribute docstring. A field's `metadata` may refine its flag:

- `flag`: another flag name (`"--include-path"`), or None for a field that has no flag;
- `group`: the title of the `--help` section it is listed under;
- `choices`: the allowed values (else `choices[name]` given to `add_flags`);
- `repeat`: a list field given as a repeatable flag; `csv`: a list/tuple field given as one
  comma-separated string (the verb parses and checks it).

The flags' destinations are the field names, so `values_of(cls, args)` gives the constructor's keywords.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from collections.abc import Mapping
from functools import cache
from typing import Any

SCALARS = {"int": int, "float": float, "str": str}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """field name -> its attribute docstring (the string right after the field), whitespace folded."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):  # no source (a frozen binary): flags without help
        return {}
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def flag_of(f: dataclasses.Field) -> str | None:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _kwargs(f: dataclasses.Field, help_text: str, choices: Mapping[str, Any]) -> dict[str, Any]:
    help_text = help_text.rstrip(".")
    kind = str(f.type).replace(" ", "")
    base = kind.removesuffix("|None")
    default = _default(f)
    kw: dict[str, Any] = {"dest": f.name}
    if base != "bool":
        kw["metavar"] = f.metadata.get("metavar", flag_of(f).lstrip("-").upper().replace("-", "_"))
    if base == "bool":
        kw.update(action="store_true", default=bool(default))
    elif f.metadata.get("repeat"):
        kw.update(action="append", default=list(default or []))
    elif f.metadata.get("csv"):
        kw.update(default=",".join(default or ()))
        help_text += f" (comma-separated; default {kw['default']})" if kw["default"] else " (comma-separated)"
    elif base in SCALARS:
        kw.update(type=SCALARS[base], default=default)
        allowed = f.metadata.get("choices", choices.get(f.name))
        if allowed:
            kw["choices"] = [c for c in allowed if c is not None]
            kw.pop("metavar")
        if default is not None:
            help_text += f" (default {default})"
    else:
        raise TypeError(f"{f.name}: no flag for a field of type {f.type}")
    kw["help"] = help_text.replace("%", "%%")
    return kw


def add_flags(parser: argparse.ArgumentParser, cls: type, *, choices: Mapping[str, Any] | None = None,
              groups: dict[str, Any] | None = None) -> list[str]:
    """Add a flag per field of `cls` (in field order) to `parser`; returns the fields that got one."""
    docs, groups, names = field_docs(cls), groups if groups is not None else {}, []
    for f in dataclasses.fields(cls):
        flag = flag_of(f)
        if flag is None:
            continue
        title = f.metadata.get("group")
        target = parser if title is None else groups.setdefault(title, parser.add_argument_group(title))
        target.add_argument(flag, **_kwargs(f, docs.get(f.name, ""), choices or {}))
        names.append(f.name)
    return names


def values_of(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed values of `cls`'s flags, by field name."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if flag_of(f) is not None}
