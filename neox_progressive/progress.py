"""Progress bars (tqdm) drawn only where a person watches them.

A bar is drawn on stderr when it is a terminal, unless the verb runs with `--quiet` or the
environment sets `TQDM_DISABLE` (tqdm's own switch, honoured here for every tqdm version). Logs
redirected to a file or a pipe (a cluster job's output) get no bar and no carriage-return debris.
"""

from __future__ import annotations

import os
import sys

OFF = ("", "0", "false", "no", "off")


def bars_wanted(quiet: bool = False) -> bool:
    """True where a bar should be drawn: not quiet, no TQDM_DISABLE, stderr a terminal."""
    if quiet or os.environ.get("TQDM_DISABLE", "").strip().lower() not in OFF:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # stderr replaced or closed
        return False


def progress_bar(iterable=None, *, quiet: bool = False, **kw):
    """`tqdm(iterable, **kw)` on stderr, disabled unless `bars_wanted(quiet)`."""
    from tqdm import tqdm

    return tqdm(iterable, disable=not bars_wanted(quiet), file=sys.stderr, **kw)
