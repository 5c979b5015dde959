"""One writer at a time: an advisory lock on a lock file, naming its holder.

`OutputLock(path, what)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `path` and writes the holder
(PID, host, command line, start time) into it. A second process refuses at once with a UserError
naming the first's PID and command. The kernel drops a flock when its process dies, however it
dies, so the lock of a dead process (SIGKILL, a node reboot on a local disk) is simply taken over;
the holder record it left is reported as taken over.

The lock file is removed on release while still locked, and a taker checks after locking that the
file it locked is still the one at `path` (else it retries): so removing the file never lets two
processes hold the lock. On a file system without flock (some network mounts) the record alone
decides: a holder on this host whose PID is alive keeps the lock, anything else is taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from neox_progressive.errors import UserError

NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def pid_alive(pid: int) -> bool:
    """True if a process with this PID exists on this host (or belongs to another user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def holder_record() -> dict:
    """Who this process is, as written into lock files and temporary directories."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": shlex.join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def read_record(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(rec: dict) -> str:
    host = f" on {rec['host']}" if rec.get("host") and rec.get("host") != socket.gethostname() else ""
    return (f"PID {rec.get('pid', '?')}{host} (`{rec.get('command', '?')}`, started {rec.get('started', '?')})")


class OutputLock:
    """Exclusive advisory lock of an output (a context manager; see the module docstring).

    Args:
        path: the lock file (created; removed on release).
        what: the output it protects, for the message (e.g. "family output dir runs/tiny").
    """

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.what = what
        self.fd: int | None = None
        self.took_over: dict | None = None
        """The record of a dead holder whose lock this process took over, if any."""

    def acquire(self) -> OutputLock:
        for _ in range(100):  # the file can be removed between open and flock; then lock the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                if not self._flock(fd):
                    continue
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    self._claim(fd)
                    self.fd, fd = fd, None
                    return self
            finally:
                if fd is not None:
                    os.close(fd)
        raise UserError(f"could not lock {self.path} (it keeps being replaced); is another process removing it?")

    def _flock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            self._refuse(read_record(self.path))
        except OSError as exc:
            if exc.errno not in NO_FLOCK:
                raise
        rec = read_record(self.path)  # no flock here: the record decides
        if rec.get("host") == socket.gethostname() and pid_alive(int(rec.get("pid", 0) or 0)) \
                and rec.get("pid") != os.getpid():
            self._refuse(rec)
        return True

    def _refuse(self, rec: dict) -> None:
        raise UserError(f"{self.what} is in use by {describe_holder(rec)}; two processes must not write it at once: "
                        f"wait for that one to finish (or stop it), then run again")

    def _claim(self, fd: int) -> None:
        old = read_record(self.path)
        if old.get("pid") and old.get("pid") != os.getpid():
            self.took_over = old
        data = json.dumps(holder_record()).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still locked: no one can hold a lock on this inode now
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


def remove_stale_locks(parent: str | Path) -> list[Path]:
    """Remove the lock files (`.*.lock` holding a holder record) in `parent` that no process holds: left by a killed
    writer. Each is removed while locked by this process, so a live holder is never affected; skipped where the file
    system has no flock."""
    removed = []
    parent = Path(parent)
    for path in parent.glob(".*.lock") if parent.is_dir() else []:
        if not read_record(path).get("pid"):
            continue
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                path.unlink()
                removed.append(path)
        except OSError:  # held by a live process, replaced meanwhile, or no flock here
            pass
        finally:
            os.close(fd)
    return removed
