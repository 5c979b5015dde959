"""Helpers for the bad-input tests: the CLI in a subprocess, a file tree's snapshot, private mounts.

Every case runs `python -m neox_progressive ...` in its own process and checks the exit status, that
stderr is one `error: ...` line (no traceback) and that nothing was written. File-system cases that
need a read-only or a full disk run inside a private mount namespace (`unshare -rm`: an unprivileged
user namespace, or root's own), where a real tmpfs is mounted; the mount disappears with the process.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(torch.get_num_threads()), TQDM_DISABLE="1")


def cli(*args, cwd: Path | None = None, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`neox-progressive ARGS` in a fresh process; text stdout/stderr captured."""
    return subprocess.run([sys.executable, "-m", "neox_progressive", *map(str, args)], cwd=cwd, env=env or ENV,
                          capture_output=True, text=True, timeout=timeout)


def one_line_error(res: subprocess.CompletedProcess, code: int = 2) -> str:
    """The single `error:` line of a refused command (asserting the exit status and that there is no traceback)."""
    err = res.stderr.strip()
    assert res.returncode == code, (res.returncode, res.stdout[-2000:], err[-3000:])
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err
    return lines[0]


def snapshot(root: Path) -> dict[str, int]:
    """Every path under `root` (hidden ones too) with its size: compared before and after a refused command."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1) for p in sorted(root.rglob("*"))}


def _namespace_works() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    try:
        return subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || "
                               "mount -t tmpfs -o size=64k tmpfs /tmp"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


NAMESPACE = _namespace_works()
needs_namespace = pytest.mark.skipif(not NAMESPACE, reason="needs `unshare -rm` (user + mount namespaces) to mount a tmpfs")


def in_namespace(mount_dir: Path, options: str, *cli_args, before: str = "", after: str = "",
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """Mount a tmpfs with `options` (e.g. "ro,size=1m") at `mount_dir` in a private mount namespace, run the shell
    `before`, then the CLI with `cli_args`, then the shell `after` (its output follows the CLI's); the exit status is
    the CLI's. The mount vanishes with the namespace."""
    mount_dir.mkdir(parents=True, exist_ok=True)
    cmd = shlex.join([sys.executable, "-m", "neox_progressive", *map(str, cli_args)])
    script = (f"mount -t tmpfs -o {options} tmpfs {shlex.quote(str(mount_dir))} || exit 99\n{before}\n"
              f"{cmd}\nrc=$?\n{after}\nexit $rc\n")
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert res.returncode != 99, res.stderr
    return res


def fill_to(mount_dir: Path, free: int) -> str:
    """Shell lines that fill the tmpfs at `mount_dir` until `free` bytes (rounded up to whole pages) are left."""
    code = ("import os,sys; d=sys.argv[1]; st=os.statvfs(d); want=int(sys.argv[2]); page=st.f_frsize; "
            "want=-(-want//page)*page; n=st.f_bavail*page-want; open(os.path.join(d,'filler'),'wb').write(b'\\0'*n)")
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)} {shlex.quote(str(mount_dir))} {free}"
