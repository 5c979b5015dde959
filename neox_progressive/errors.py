"""The one exception type users see, and the one-line wording of the errors their system raises.

A `UserError` carries a one-line message that says what is wrong, which file or key, the
expected and the actual value, and how to fix it. The CLI prints it without a traceback
(``--debug`` shows one). `assert` is kept for internal invariants only.

The CLI's handler also turns what the user's file system raises (`OSError` with an errno: a
read-only or full disk, a file where a directory goes) and unreadable files
(`UnicodeDecodeError`) into one line naming the path and the fix (`system_error_line`).
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Bad input from the user: a file, a config key, a flag. Printed as one line."""

    exit_code = 2


class CheckFailed(UserError):
    """A check ran and found problems (for example ``inspect --config``). Exit status 1."""

    exit_code = 1


# errno -> what to do about it (the first words of the line come from the OS).
OS_FIXES = {
    errno.EROFS: "the file system is read-only: choose a destination on a writable file system",
    errno.EACCES: "no permission: fix the permissions of that path or choose another destination",
    errno.EPERM: "not permitted: fix the permissions of that path or choose another destination",
    errno.ENOSPC: "the disk is full: free space there or choose another destination",
    errno.EDQUOT: "the disk quota is exhausted: free space there or choose another destination",
    errno.ENOTDIR: "a part of that path is a file, not a directory: choose a path whose parents are directories",
    errno.EISDIR: "that path is a directory where a file was expected: pass the file",
    errno.EEXIST: "that path already exists: remove it or choose another one",
    errno.ENOENT: "that path does not exist: check the spelling, or create its directory first",
    errno.ENAMETOOLONG: "that path is too long: choose a shorter one",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n)",
}


def system_error_line(exc: BaseException) -> str:
    """One line for an OSError or UnicodeDecodeError the user's files or system caused."""
    if isinstance(exc, UnicodeDecodeError):
        return (f"a file is not text in {exc.encoding} (byte {exc.object[exc.start:exc.start + 1]!r} at offset "
                f"{exc.start}): pass a text file (YAML, JSON or plain text), not a binary one")
    if isinstance(exc, OSError):
        paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
        name = errno.errorcode.get(exc.errno or 0, "")
        what = exc.strerror or str(exc)
        fix = OS_FIXES.get(exc.errno or -1, "check that path and the file system it is on")
        return f"{paths + ': ' if paths else ''}{what}{f' ({name})' if name else ''}; {fix}"
    return str(exc)
