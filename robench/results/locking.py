"""One run per directory: an exclusive lock held while a command writes into a run directory.

Two runs started with the same ``--out`` would otherwise both finish and
overwrite each other's files. The lock is ``flock`` on a small file in the
directory: the kernel releases it when the process ends, however it ends, so
a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from robench.errors import UsageError

LOCK_FILE = ".robench.lock"

try:  # flock exists on every POSIX system; Windows runs unlocked.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

_held: dict[Path, int] = {}  # run directory -> open descriptor of its lock file
_fresh: set[Path] = set()  # run directories this process created: removed again if nothing was written


def lock_run_dir(path: Path, fresh: bool = False) -> None:
    """Take the directory's lock, or refuse with the holder's pid; also proves the directory is writable.

    ``fresh`` says the directory was made for this run: if the run ends without writing
    anything there (it failed early), releasing the lock removes the empty directory, so
    failed runs do not litter ``runs/`` with folders that readers would trip over.
    """
    key = path.resolve()
    if fresh:
        _fresh.add(key)
    if key in _held:
        return
    lock_path = path / LOCK_FILE
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write to output directory {path}: {exc.strerror or exc}") from None
        if not _try_lock(fd):
            holder = _read_pid(fd)
            os.close(fd)
            raise UsageError(f"another robench run{f' (pid {holder})' if holder else ''} is writing to {path}; "
                             "wait for it to finish or choose another --out")
        # The previous holder may have removed the file between our open and our lock:
        # then we locked a file nobody else will see, so start again on the current one.
        if _same_file(fd, lock_path):
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


def release_run_dirs() -> None:
    """Give back every lock this process holds (the end of a command)."""
    for key, fd in list(_held.items()):
        try:
            os.unlink(key / LOCK_FILE)  # removed before unlocking: see the inode check above
        except OSError:
            pass
        os.close(fd)
        del _held[key]
        if key in _fresh:
            _fresh.discard(key)
            _remove_if_empty(key)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()  # only succeeds on an empty directory: anything written stays
    except OSError:
        pass


def _try_lock(fd: int) -> bool:
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isascii() and text.isdigit() else None
