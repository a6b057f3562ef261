"""One writer per run directory: an OS file lock held while a process trains into it.

``flock`` locks belong to the open file, so the OS releases them when the holder exits or dies
(``kill -9`` included): a stale lock cannot outlive its process. The lock file records the
holder's PID and command so a refused second writer can say who holds the directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import sys
from pathlib import Path

LOCK_FILE = ".sparselm.lock"


class RunLockedError(RuntimeError):
    """Another live process is writing this run directory."""


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold the run directory's lock (rank 0 only under torchrun: the other ranks write nothing)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            raise RunLockedError(f"{run_dir} is being written by another sparselm process ({holder}); "
                                 "wait for it to finish, stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"PID {os.getpid()}: {' '.join(sys.argv)[:300]}\n".encode(), 0)
        try:
            yield
        except BaseException:
            if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:  # failed before writing anything
                path.unlink()
                run_dir.rmdir()
            raise
        os.ftruncate(fd, 0)  # the file stays (unlinking it would race a waiting process); it names no holder now
    finally:
        os.close(fd)  # releases the lock


def writes_run(fn):
    """Decorate a phase ``fn(cfg, ...)`` so that it holds ``cfg.run.out``'s lock while it runs."""
    @functools.wraps(fn)
    def locked(cfg, *args, **kwargs):
        with run_lock(cfg.run.out):
            return fn(cfg, *args, **kwargs)
    return locked
