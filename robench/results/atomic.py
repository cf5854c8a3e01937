"""Writing a file so that readers never see half of it, and naming the disk when it is full."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from robench.errors import RunError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def current_umask() -> int:
    # os.umask can only be read by setting it; it is set straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def disk_full_error(path: Path) -> RunError:
    """Name the disk, not the library call that noticed it."""
    try:
        free = f"{shutil.disk_usage(path.parent).free:,} bytes free"
    except OSError:
        free = "free space unknown"
    return RunError(f"no space left on the device holding {path.parent} ({free}) while writing {path.name}; "
                    "free some space and run the same command again (finished work is resumed, not redone)")


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


def atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename: readers never see half a file."""
    write_file_atomically(path, text.encode("utf-8"))


def write_file_atomically(path: Path, data: bytes) -> None:
    """Bytes to a temporary file, then a rename; the file gets the mode the umask asks for."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as exc:
        raise _write_error(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # a full disk can surface only here
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600 whatever the umask
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_error(path: Path, exc: OSError) -> RunError:
    if is_disk_full(exc):
        return disk_full_error(path)
    return RunError(f"cannot write {path}: {exc.strerror or exc}")
