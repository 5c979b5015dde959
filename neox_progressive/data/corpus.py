"""Input documents: text and JSONL files, and a real-text corpus every machine has.

`read_documents` follows what NeoX's preprocess_data.py gets from lm_dataformat: a `.jsonl` file
holds one document per line (the `text` key by default; a list value is joined with blank
lines; a bare JSON string is a document), any other file is one document; empty documents are skipped.

`stdlib_corpus` is real English technical prose without a download: the docstrings of the Python
standard library's own source files (modules, classes, functions), read with `ast` (nothing is
imported or run), in sorted file order. The same Python version gives the same corpus.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from neox_progressive.errors import UserError

# Parts of the standard library that are tests, tools or GUI demos rather than library prose.
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "ensurepip",
             "__pycache__", "config-3", "tkinter", "venv", "pydoc_data"}
MIN_DOC_CHARS = 40


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in root.rglob("*.py"):
        parts = p.relative_to(root).parts
        if any(part in SKIP_DIRS or part.startswith("config-") for part in parts[:-1]):
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOC_CHARS:
                yield doc


def stdlib_corpus(n_chars: int | None = None) -> list[str]:
    """Docstrings of the Python standard library as documents, about `n_chars` characters in all.

    Args:
        n_chars: stop once this many characters are collected (None: all, about 1.5M on 3.11).

    Returns:
        A list of documents (one docstring each), deterministic for a given Python installation.
    """
    docs: list[str] = []
    total = 0
    for path in _stdlib_files():
        for doc in _docstrings(path):
            docs.append(doc)
            total += len(doc)
            if n_chars is not None and total >= n_chars:
                return docs
    if not docs:
        raise UserError(f"no Python standard library sources found under {sysconfig.get_paths()['stdlib']}; "
                        "this Python installation ships without .py files: pass text files instead")
    return docs


def read_documents(path: str | Path, key: str = "text") -> Iterator[str]:
    """Documents of one input file: JSONL lines (value of `key`) or a whole text file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file {str(path)!r} does not exist")
    if path.suffix != ".jsonl":
        text = path.read_text(encoding="utf-8", errors="replace")
        if text:
            yield text
        return
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object") from None
            if isinstance(obj, str):  # a bare string is a document (lm_dataformat's legacy form)
                obj = {key: obj}
            if not isinstance(obj, dict) or key not in obj:
                found = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
                raise UserError(f"{path}:{lineno}: no key {key!r} (found {found}); choose the text key with --jsonl-key")
            value = obj[key]
            if isinstance(value, list):
                value = "\n\n".join(map(str, value))
            if not isinstance(value, str):
                raise UserError(f"{path}:{lineno}: {key!r} is a {type(value).__name__}, expected a string")
            if value:
                yield value
