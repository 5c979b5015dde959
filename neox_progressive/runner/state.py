"""The family run's state file: which steps are done, and checksums of what they produced.

`<family dir>/<mode>/state.json` maps a step name (``"2B/expand"``, ``"2B/train"``, ...) to a
record ``{"outputs": {path: digest}, "info": {...}, "finished": time}``. A step counts as done
only if every recorded output still has the recorded digest, so a run that is killed at any
moment, or whose outputs were changed or deleted afterwards, redoes exactly the steps whose
results are not there. The file is replaced atomically (write, fsync, rename).

A directory's digest is the sha256 over its files' relative paths and contents (hidden
temporary directories excluded), so a checkpoint digest does not depend on timestamps. A NeoX save
dir (one with `latest`) is digested as what the next step reads from it: `latest` and the model
files (`*model_states.pt`) of the tag it names. Earlier checkpoints and optimizer states, which can
be hundreds of GB at the paper's sizes, are not read again on every check.

A YAML config as a step's input is digested by its content (`config_digest`: the parsed values as
canonical JSON), so a comment does not count: renaming the family file changes the header comment of
every stage YAML, and must not retrain the family. Records written before this digest existed held
the file's raw digest; `inputs_match` still accepts those while the file is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIGEST = "yaml-sha256:"
"""Prefix of a config's content digest (a raw file digest has none)."""


def digest(path: str | Path) -> str | None:
    """sha256 of a file, of a directory tree (relative names + contents), or of a NeoX save dir's
    latest checkpoint (see the module docstring); None if missing."""
    path = Path(path)
    if not path.exists():
        return None
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
    elif (path / "latest").is_file():
        tag = path / (path / "latest").read_text().strip()
        files = [path / "latest", *sorted(tag.glob("*model_states.pt"))] if tag.is_dir() else [path / "latest"]
    else:
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    for f in files:
        h.update(str(f.relative_to(path) if f != path else f.name).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def config_digest(text: str | None) -> str | None:
    """Digest of a YAML config's content (`CONFIG_DIGEST` + sha256 of its values as canonical JSON); None if missing."""
    if text is None:
        return None
    data = json.dumps(yaml.safe_load(text), sort_keys=True, separators=(",", ":"), default=str)
    return CONFIG_DIGEST + hashlib.sha256(data.encode()).hexdigest()


def raw_digest(name: str, text: str | None) -> str | None:
    """What `digest` gives for a file `name` holding `text` (the form earlier versions recorded for configs)."""
    if text is None:
        return None
    h = hashlib.sha256()
    h.update(name.encode() + b"\0")
    h.update(text.encode())
    h.update(b"\0")
    return h.hexdigest()


def inputs_match(recorded: Any, current: Mapping[str, Any], legacy: Mapping[str, str | None]) -> bool:
    """Recorded step inputs equal to `current`; a config input recorded as a raw file digest (earlier versions) counts
    as equal when it is `legacy[key]`, the raw digest of the same file now."""
    if recorded == current:
        return True
    if not isinstance(recorded, dict) or recorded.keys() != current.keys():
        return False
    return all(recorded[k] == v or (k in legacy and isinstance(recorded[k], str) and not recorded[k].startswith(CONFIG_DIGEST)
                                   and recorded[k] == legacy[k]) for k, v in current.items())


class RunState:
    """Persistent record of completed steps (see module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.steps: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self.steps = json.loads(self.path.read_text()).get("steps", {})

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        with tmp.open("w") as f:
            json.dump({"steps": self.steps}, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def done(self, step: str) -> bool:
        """True if `step` finished and all its outputs are unchanged."""
        rec = self.steps.get(step)
        if rec is None:
            return False
        return all(digest(p) == d for p, d in rec["outputs"].items())

    def info(self, step: str) -> dict[str, Any]:
        return dict(self.steps.get(step, {}).get("info", {}))

    def record(self, step: str, outputs: list[str | Path], info: dict[str, Any] | None = None) -> None:
        """Mark `step` done with the current digests of `outputs`."""
        self.steps[step] = {
            "outputs": {str(p): digest(p) for p in outputs},
            "info": info or {},
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self._save()

    def forget(self, step: str) -> None:
        if self.steps.pop(step, None) is not None:
            self._save()
