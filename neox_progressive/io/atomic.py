"""Writing a directory atomically, safely and alone: the temp / permission / space / lock logic of every writer.

`AtomicDir(out)` builds `out` under a hidden temporary name beside it and renames it into place on
success, so a crash at any moment leaves either nothing or a complete `out`. On the way it refuses
what cannot work before any work starts (`check_destination`: an existing `out`, a parent that is a
file, a read-only or unwritable parent, too little free space), locks `out` against a second writer,
removes the temporary dirs that killed writers left beside it, gives the new dirs the umask's mode,
and turns a full disk mid-write into one line naming the device and the file.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path

from neox_progressive.errors import UserError
from neox_progressive.io.lock import OutputLock, holder_record, pid_alive, read_record, remove_stale_locks

TMP_MARK = ".tmp-neox-progressive-"
OWNER_FILE = ".owner.json"
"""Inside every temporary dir: the holder record (PID, host, command) of the process writing it."""


def _first_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_destination(out: str | Path, force: bool, what: str = "--out") -> Path:
    """Refuse a destination that cannot be written, before any work starts.

    An existing `out` needs `force` and must be a directory; its parents must be directories (or not
    exist yet) on a writable file system where this user may create files.
    """
    out = Path(out)
    if out.exists() and not force:
        raise UserError(f"{out} already exists; choose another {what} or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise UserError(f"{what} {out} exists and is a file, not a directory; remove it or choose another {what}")
    check_writable_parent(out, what)
    return out


def check_writable_parent(out: str | Path, what: str = "--out") -> Path:
    """The nearest existing ancestor of `out`, checked to be a writable directory (one-line UserErrors)."""
    return check_writable_dir(Path(out).parent, what, shown=Path(out))


def check_writable_dir(path: str | Path, what: str, shown: Path | None = None) -> Path:
    """`path` (or, while it does not exist, its nearest existing ancestor) checked to be a directory this user may
    create files in, on a writable file system; returns that directory."""
    shown = Path(shown or path)
    base = _first_existing(Path(path))
    if not base.is_dir():
        raise UserError(f"{what} {shown}: {base} is a file, so no directory can be created there; "
                        f"choose a {what} whose parents are directories")
    if not os.access(base, os.W_OK | os.X_OK):
        if _read_only(base):
            raise UserError(f"{what} {shown}: {base} is on a read-only file system; choose a destination on a writable one")
        raise UserError(f"{what} {shown}: no permission to create files in {base}; fix its permissions or choose "
                        f"another {what}")
    return base


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def current_umask() -> int:
    """The process umask, read without changing it where the kernel reports it (Linux >= 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def free_bytes(path: str | Path) -> int:
    """Bytes this user may still write on the file system holding `path` (or its nearest existing parent)."""
    st = os.statvfs(_first_existing(Path(path)))
    return st.f_bavail * st.f_frsize


def mount_point(path: str | Path) -> Path:
    p = _first_existing(Path(path)).resolve()
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def check_free_space(out: str | Path, need: int, what: str = "--out") -> None:
    """Refuse to start a write of about `need` bytes that cannot fit (one line naming the device)."""
    free = free_bytes(Path(out).parent)
    if need > free:
        raise UserError(f"not enough space on {mount_point(Path(out).parent)} for {what} {out}: needs about {need:,} "
                        f"bytes, {free:,} free; free space there or choose another {what}")


def disk_full(exc: BaseException, where: Path) -> bool:
    """Did `exc`, raised while writing under `where`, come from a full disk? torch.save reports it as an
    unrelated RuntimeError ("unexpected pos ..."), safetensors as its own error type: so besides the errno,
    a write error on a file system left with (almost) no free space counts."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(exc, (OSError, RuntimeError)) and "safetensor" not in type(exc).__name__.lower():
        return False
    if "No space left" in str(exc) or "os error 28" in str(exc):
        return True
    try:
        return free_bytes(where) < (4 << 20)
    except OSError:
        return False


def stale_temps(parent: str | Path) -> list[tuple[Path, dict, bool]]:
    """The temporary dirs of neox-progressive writers in `parent`: (path, holder record, stale).

    Stale: made on this host by a process that no longer exists (it was killed mid-write). A dir made on
    another host (a shared file system) is never stale here: its writer may be running there.
    """
    out = []
    parent = Path(parent)
    if not parent.is_dir():
        return out
    host = socket.gethostname()
    for p in parent.glob(f".*{TMP_MARK}*"):
        if not p.is_dir():
            continue
        rec = read_record(p / OWNER_FILE)
        pid = rec.get("pid") if rec else p.name.rsplit("-", 1)[-1]
        try:
            pid = int(pid)
        except (TypeError, ValueError):
            continue
        mine = not rec or rec.get("host") == host
        out.append((p, rec, mine and not pid_alive(pid)))
    return out


def remove_stale_temps(parent: str | Path) -> list[Path]:
    """Remove the stale temporary dirs in `parent` (see `stale_temps`) and the lock files killed writers left there
    (`io.lock.remove_stale_locks`); returns the dirs removed."""
    removed = []
    for p, _, stale in stale_temps(parent):
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    remove_stale_locks(parent)
    return removed


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class AtomicDir:
    """A directory built under a temporary name and renamed to `out` on success.

    While it is written, `.<out name>.lock` beside `out` is locked (`io.lock.OutputLock`): a second
    writer of the same `out` is refused, naming the first. Temporary dirs of dead writers beside `out`
    (any name) are removed on entry. The directories made get the mode the umask gives (not
    mkdtemp's 0700), so a team on a shared cluster can read each other's outputs. With `need_bytes`
    the free space is checked on entry, and a full disk mid-write is one line naming the device.
    """

    def __init__(self, out: str | Path, force: bool = False, *, need_bytes: int | None = None, what: str = "--out"):
        self.out = check_destination(out, force, what)
        self.force = force
        self.need_bytes = need_bytes
        self.what = what
        self.tmp: Path | None = None
        self.current: Path | None = None
        """The file being written (writers set it), for the message of a full disk."""
        self.free_at_start = 0
        self._lock: OutputLock | None = None

    def __enter__(self) -> Path:
        parent = self.out.parent
        parent.mkdir(parents=True, exist_ok=True)
        if self.need_bytes is not None:
            check_free_space(self.out, self.need_bytes, self.what)
        self._lock = OutputLock(parent / f".{self.out.name}.lock", f"{self.what} {self.out}").acquire()
        try:
            check_destination(self.out, self.force, self.what)  # another writer may have finished meanwhile
            remove_stale_temps(parent)
            self.free_at_start = free_bytes(parent)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}{TMP_MARK}", suffix=f"-{os.getpid()}", dir=parent))
            os.chmod(self.tmp, 0o777 & ~current_umask())
            (self.tmp / OWNER_FILE).write_text(json.dumps(holder_record()))
        except BaseException as exc:
            full = self.tmp is not None and disk_full(exc, self.tmp)
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
            self._release()
            if full and not isinstance(exc, UserError):
                raise self._full(exc) from exc
            raise
        return self.tmp

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _full(self, exc: BaseException) -> UserError:
        file = getattr(exc, "filename", None) or self.current or self.tmp
        need = f"needs about {self.need_bytes:,} bytes, " if self.need_bytes is not None else ""
        return UserError(f"no space left on {mount_point(self.out.parent)} writing {file} ({need}"
                         f"{self.free_at_start:,} free at the start); nothing was written to {self.out}: free space "
                         f"there or choose another {self.what}")

    def __exit__(self, exc_type, exc, tb):
        assert self.tmp is not None
        try:
            if exc_type is not None:
                full = disk_full(exc, self.tmp)
                shutil.rmtree(self.tmp, ignore_errors=True)
                if full and not isinstance(exc, UserError):
                    raise self._full(exc) from exc
                return False
            (self.tmp / OWNER_FILE).unlink(missing_ok=True)
            old = None
            if self.out.exists():
                if not self.force:  # appeared while we worked
                    shutil.rmtree(self.tmp, ignore_errors=True)
                    raise UserError(f"{self.out} appeared while writing; not replaced (use --force)")
                old = self.out.with_name(f".{self.out.name}{TMP_MARK}old-{os.getpid()}")
                os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return False
        finally:
            self._release()


def temp_notes(dirs, remove: bool = False) -> list[str]:
    """One line per neox-progressive temporary dir in `dirs` (each dir and its subdirs one level down): where it
    is, how big, whose; with `remove`, stale ones (see `stale_temps`) are removed and said so."""
    seen: set[Path] = set()
    notes = []
    for d in dirs:
        d = Path(d)
        for parent in [d, *(p for p in (d.iterdir() if d.is_dir() else []) if p.is_dir() and TMP_MARK not in p.name)]:
            for p, rec, stale in stale_temps(parent):
                if p in seen:
                    continue
                seen.add(p)
                size = tree_bytes(p)
                who = f"PID {rec.get('pid')} (`{rec.get('command', '?')}`)" if rec else f"PID {p.name.rsplit('-', 1)[-1]}"
                if stale and remove:
                    shutil.rmtree(p, ignore_errors=True)
                    remove_stale_locks(parent)
                    notes.append(f"removed {p} ({size:,} bytes), left by {who}, which was killed while writing")
                elif stale:
                    notes.append(f"{p} ({size:,} bytes) was left by {who}, which was killed while writing; it is "
                                 "removed by the next write beside it, or delete it")
                else:
                    notes.append(f"{p} ({size:,} bytes) is being written by {who}"
                                 + (f" on {rec['host']}" if rec.get("host") != socket.gethostname() and rec else ""))
    return notes
