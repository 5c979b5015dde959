#!/usr/bin/env python
"""Expand a NeoX checkpoint: the same as `neox-progressive expand` (see --help).

Runs from a checkout without installing: the repo root is put on sys.path when the package is
not importable.
"""

import sys
from pathlib import Path

try:
    import neox_progressive  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from neox_progressive.cli import run_tool  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_tool("expand"))
