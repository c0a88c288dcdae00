"""One run per directory: the run holds an exclusive lock on `run.lock` in its run directory while it runs, and
a second process that targets the directory is refused with one line naming the first.

The lock is the operating system's (flock), so it goes with the process that held it: a run killed by SIGKILL or
a power cut leaves the file behind, and the next run takes it over.
"""

from __future__ import annotations

import fcntl
import functools
import os
import socket
from pathlib import Path

from common import artifacts
from common.rundir import RunDirError, check_writable

_held: list[tuple[int, Path, Path]] = []  # (file descriptor, lock file, the directory that existed before)


def check_not_in_use(run_dir: Path) -> None:
    """Refuse at once when another process holds the directory, before its half-written run is judged."""
    path = run_dir / artifacts.LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (or none this user may read): acquire() decides
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        _refuse(run_dir, fd)
    os.close(fd)


def _refuse(run_dir: Path, fd: int):
    holder = os.read(fd, 200).decode(errors="replace").strip() or "whose id it has not written yet"
    os.close(fd)
    raise RunDirError(f"{run_dir}: in use by another run (process {holder}): wait for it to end, or pass "
                      "--output-dir with another directory")


def acquire(run_dir: Path) -> None:
    """Take the run directory (made if missing) for this process, or refuse: it is in use."""
    check_writable(run_dir)
    existed = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / artifacts.LOCK
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _refuse(run_dir, fd)
        # The holder may have removed the file between our open and our lock: then lock the file that is there now.
        if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode())
    _held.append((fd, path, existed))


def release_all() -> None:
    """Remove this process's lock files (and the directories it made for them that stayed empty), then unlock."""
    while _held:
        fd, path, existed = _held.pop()
        path.unlink(missing_ok=True)  # while still locked, so no other process takes a file about to vanish
        os.close(fd)
        made = path.parent
        while made != existed and made.is_dir() and not any(made.iterdir()):
            made.rmdir()
            made = made.parent


def released_after(function):
    """Decorator: whatever run directory `function` locked is released when it returns or raises."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        finally:
            release_all()

    return wrapper
