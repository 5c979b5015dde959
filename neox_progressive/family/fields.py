"""Typed reading of one mapping of a family file: known keys, types, defaults, one-line errors.

Every error names the file and the dotted key (`members[2].hidden_size`), says what was expected
and what was found, and how to fix it; an unknown key gets a "did you mean" from the known ones.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from neox_progressive.errors import UserError

REQUIRED = object()


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """' (did you mean X?)' for the closest known name, or ''."""
    close = difflib.get_close_matches(str(name), list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def type_name(kind) -> str:
    if isinstance(kind, tuple):
        return " or ".join(type_name(k) for k in kind)
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false", list: "a list",
            dict: "a mapping"}.get(kind, getattr(kind, "__name__", str(kind)))


class Section:
    """One mapping of the family file, read key by key.

    `where` is the file plus the dotted path, e.g. ``family.yml: training.lr``.
    Call `get` for every known key, then `done()` rejects whatever was not asked for.
    """

    def __init__(self, data: Any, where: str, file: str):
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise UserError(f"{file}: {where or 'the file'} must be a mapping of keys, got {type(data).__name__} {data!r}")
        self.data = dict(data)
        self.where = where
        self.file = file
        self.known: list[str] = []

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, msg: str) -> UserError:
        return UserError(f"{self.file}: {self.key(name)}: {msg}")

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def get(self, name: str, kind, default: Any = REQUIRED, *, choices: Iterable | None = None,
            positive: bool = False, example: str = "") -> Any:
        """The value of `name` checked against `kind` (int, float, str, bool, list, dict or a tuple of them)."""
        self.known.append(name)
        value = self.data.get(name)
        if value is None:
            if default is REQUIRED:
                hint = f", e.g. {name}: {example}" if example else ""
                raise self.fail(name, f"missing; this key is required{hint}")
            return default
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, str):
            try:  # PyYAML reads 1e-4 (no dot) as a string; a family file may say it that way
                value = float(value)
            except ValueError:
                pass
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if int in kinds and float not in kinds and isinstance(value, float) and value.is_integer() and abs(value) >= 1e3:
            value = int(value)  # 2.0e10 tokens written as a float
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            raise self.fail(name, f"expected {type_name(kind)}, got {type(value).__name__} {value!r}")
        if choices is not None:
            allowed = list(choices)
            norm = value.lower() if isinstance(value, str) else value
            if norm not in allowed:
                raise self.fail(name, f"{value!r} is not one of {allowed}{did_you_mean(str(value), map(str, allowed))}")
            value = norm
        if positive and not value > 0:
            raise self.fail(name, f"must be > 0, got {value!r}")
        return value

    def section(self, name: str, required: bool = False) -> Section:
        self.known.append(name)
        if required and name not in self.data:
            raise self.fail(name, "missing; this block is required (see configs/neox/README.md)")
        return Section(self.data.get(name), self.key(name), self.file)

    def raw(self, name: str, default: Any = None) -> Any:
        self.known.append(name)
        return self.data.get(name, default)

    def done(self) -> None:
        for name in self.data:
            if name not in self.known:
                raise UserError(f"{self.file}: unknown key {self.key(str(name))!r}{did_you_mean(str(name), self.known)}; "
                                f"known keys here: {', '.join(sorted(self.known))}")
