"""The plugin's small patches to GPT-NeoX (`patches/*.patch`, see patches/README.md): apply, check, revert.

The patches are unified diffs written against GPT-NeoX commit `NEOX_COMMIT`. In a git checkout
they are applied with `git apply` (and `git apply -R`); elsewhere with the small exact applier
below: every hunk's old lines must be found verbatim (at the stated line or, if the file moved
a little, at exactly one other place), no fuzz. A patch is all-or-nothing: every file it touches
is computed in memory first and written (atomically, file by file) only when all hunks fit.

State of a patch in a tree: "applied" (it reverts cleanly), "not applied" (it applies cleanly),
or a conflict naming the file and hunk that fit neither way.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from neox_progressive.errors import UserError

NEOX_COMMIT = "ea7aefd8"
HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
APPLIED, NOT_APPLIED, CONFLICT = "applied", "not applied", "conflict"


def patches_dir() -> Path:
    """`patches/` beside the package (a source checkout or an editable install)."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent / "patches", here / "patches"):
        if cand.is_dir() and any(cand.glob("*.patch")):
            return cand
    raise UserError(f"the NeoX patches were not found next to {here} (expected {here.parent / 'patches'}/*.patch); "
                    "install neox-progressive from a source checkout (pip install -e .)")


@dataclass
class Hunk:
    old_start: int
    old: list[str]
    new: list[str]


@dataclass
class FilePatch:
    path: str
    hunks: list[Hunk] = field(default_factory=list)


@dataclass
class Patch:
    name: str
    path: Path
    files: list[FilePatch]

    @property
    def title(self) -> str:
        return self.name.removesuffix(".patch")


def parse_patch(path: Path) -> Patch:
    """Read a unified diff (git style: `--- a/x`, `+++ b/x`, hunks)."""
    files: list[FilePatch] = []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("+++ "):
            target = line[4:].split("\t")[0]
            files.append(FilePatch(target[2:] if target.startswith("b/") else target))
        elif line.startswith("@@ "):
            m = HUNK_RE.match(line)
            if not m or not files:
                raise UserError(f"{path}:{i + 1}: malformed hunk header {line!r}")
            old_n = int(m.group(2) or 1)
            new_n = int(m.group(4) or 1)
            hunk = Hunk(int(m.group(1)), [], [])
            i += 1
            while i < len(lines) and (len(hunk.old) < old_n or len(hunk.new) < new_n):
                body = lines[i]
                tag, text = (body[:1], body[1:]) if body else (" ", "")
                if tag in " -":
                    hunk.old.append(text)
                if tag in " +":
                    hunk.new.append(text)
                if tag not in " -+\\":
                    raise UserError(f"{path}:{i + 1}: unexpected line in a hunk: {body!r}")
                i += 1
            files[-1].hunks.append(hunk)
            continue
        i += 1
    if not files:
        raise UserError(f"{path} contains no file diffs")
    return Patch(path.name, path, files)


def load_patches(directory: Path | None = None) -> list[Patch]:
    directory = directory or patches_dir()
    return [parse_patch(p) for p in sorted(directory.glob("*.patch"))]


class _Misfit(Exception):
    pass


def _find(lines: list[str], block: list[str], hint: int) -> int:
    if lines[hint:hint + len(block)] == block:
        return hint
    hits = [i for i in range(len(lines) - len(block) + 1) if lines[i:i + len(block)] == block]
    if len(hits) != 1:
        raise _Misfit("not found" if not hits else f"found {len(hits)} times")
    return hits[0]


def apply_hunks(text: str, hunks: list[Hunk], reverse: bool = False) -> str:
    """Apply (or revert) the hunks of one file to its text; raises _Misfit(hunk number) if one does not fit."""
    lines = text.split("\n")
    offset = 0
    for n, h in enumerate(hunks, 1):
        old, new = (h.new, h.old) if reverse else (h.old, h.new)
        start = max(h.old_start - 1 + offset, 0) if old else h.old_start + offset
        try:
            at = _find(lines, old, start)
        except _Misfit as exc:
            raise _Misfit(f"hunk {n} (line {h.old_start}) {exc}") from None
        lines[at:at + len(old)] = new
        offset += len(new) - len(old) + (at - start)
    return "\n".join(lines)


def _read(neox_dir: Path, rel: str) -> str:
    p = neox_dir / rel
    if not p.is_file():
        raise _Misfit(f"{rel} does not exist")
    return p.read_text()


def _result(neox_dir: Path, patch: Patch, reverse: bool) -> dict[str, str]:
    """New contents of every file the patch touches; raises _Misfit('<file>: ...')."""
    out = {}
    for fp in patch.files:
        try:
            out[fp.path] = apply_hunks(_read(neox_dir, fp.path), fp.hunks, reverse)
        except _Misfit as exc:
            raise _Misfit(f"{fp.path}: {exc}") from None
    return out


def is_git_checkout(neox_dir: Path) -> bool:
    return (neox_dir / ".git").exists() and shutil.which("git") is not None


def _git_apply(neox_dir: Path, patch: Patch, reverse: bool, check: bool) -> tuple[bool, str]:
    cmd = ["git", "apply", *(["-R"] if reverse else []), *(["--check"] if check else []), str(patch.path)]
    proc = subprocess.run(cmd, cwd=neox_dir, capture_output=True, text=True)
    msg = (proc.stderr.strip().splitlines() or [""])[0]
    return proc.returncode == 0, msg.removeprefix("error: ")


def state(neox_dir: Path, patch: Patch) -> tuple[str, str]:
    """(APPLIED | NOT_APPLIED | CONFLICT, detail)."""
    if is_git_checkout(neox_dir):
        if _git_apply(neox_dir, patch, reverse=True, check=True)[0]:
            return APPLIED, ""
        ok, msg = _git_apply(neox_dir, patch, reverse=False, check=True)
        return (NOT_APPLIED, "") if ok else (CONFLICT, msg)
    try:
        _result(neox_dir, patch, reverse=True)
        return APPLIED, ""
    except _Misfit:
        pass
    try:
        _result(neox_dir, patch, reverse=False)
        return NOT_APPLIED, ""
    except _Misfit as exc:
        return CONFLICT, str(exc)


def _write(neox_dir: Path, contents: dict[str, str]) -> None:
    for rel, text in contents.items():
        target = neox_dir / rel
        tmp = target.with_name(f".{target.name}.neox-progressive.tmp")
        tmp.write_text(text)
        os.chmod(tmp, target.stat().st_mode)
        tmp.replace(target)


def change(neox_dir: Path, patch: Patch, reverse: bool) -> None:
    """Apply (reverse=False) or revert one patch; UserError naming the file if it does not fit."""
    what = "revert" if reverse else "apply"
    if is_git_checkout(neox_dir):
        ok, msg = _git_apply(neox_dir, patch, reverse, check=False)
        if not ok:
            raise UserError(f"{patch.name} does not {what} cleanly in {neox_dir}: {msg}")
        return
    try:
        contents = _result(neox_dir, patch, reverse)
    except _Misfit as exc:
        raise UserError(f"{patch.name} does not {what} cleanly in {neox_dir}: {exc}") from None
    _write(neox_dir, contents)


def check_neox_dir(neox_dir: str | Path) -> Path:
    d = Path(neox_dir)
    if not (d / "megatron").is_dir() or not (d / "deepy.py").is_file():
        raise UserError(f"{d} is not a GPT-NeoX checkout (no megatron/ or deepy.py); pass the NeoX root with --neox-dir")
    return d


def git_head(neox_dir: Path) -> str | None:
    if not is_git_checkout(neox_dir):
        return None
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=neox_dir, capture_output=True, text=True)
    return proc.stdout.strip() or None
