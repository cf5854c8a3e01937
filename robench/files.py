"""Reading a path the user named: a regular file, of bounded size, or a one-line refusal.

Every command that reads a user path goes through here. A device such as ``/dev/zero``
never ends and a FIFO blocks its reader for ever, so both are refused before one byte is
read; the file is opened non-blocking (opening a FIFO would otherwise wait for a writer)
and checked on the open descriptor, so a path swapped after a check is still caught.
At most ``limit + 1`` bytes are read, whatever the file claims its size is.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from robench.errors import UsageError


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def check_regular_file(path: str | Path, what: str, limit: int | None = None) -> os.stat_result:
    """The file's stat, or ``UsageError`` when it is missing, not a regular file, or over ``limit`` bytes.

    For libraries that take a path (safetensors, PIL, numpy): they read the file themselves.
    """
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {_reason(exc)}") from None
    _check_info(info, path, what, limit)
    return info


def _check_info(info: os.stat_result, path: str | Path, what: str, limit: int | None) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"{what} {path} is {_kind(info.st_mode)}, not a regular file")
    if limit is not None and info.st_size > limit:
        _too_large(path, what, limit)


def _too_large(path: str | Path, what: str, limit: int) -> None:
    raise UsageError(f"{path}: {what} is larger than {limit} bytes")


def read_bounded(path: str | Path, what: str, limit: int) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes; anything else is ``UsageError``."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise UsageError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory, not a regular file") from None
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {_reason(exc)}") from None
    try:  # checked on the descriptor before wrapping it: fdopen refuses a directory with its own error
        _check_info(os.fstat(fd), path, what, limit)
    except UsageError:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)  # never more: the size seen by fstat may have grown since
        except OSError as exc:
            raise UsageError(f"cannot read {what} {path}: {_reason(exc)}") from None
    if len(data) > limit:
        _too_large(path, what, limit)
    return data


def read_bounded_text(path: str | Path, what: str, limit: int) -> str:
    """``read_bounded`` decoded as UTF-8, with universal newlines as text-mode reading gives."""
    raw = read_bounded(path, what, limit)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"cannot read {what} {path}: not UTF-8 text (byte {exc.start})") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")
