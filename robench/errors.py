"""Error types that map to the CLI's exit codes.

A user sees one line for these; ``ROBENCH_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import re

EXIT_OK = 0
EXIT_REGRESSION = 1
EXIT_USAGE = 2
EXIT_RUN_FAILED = 3


class RobenchError(Exception):
    """Base class: an error whose message is meant for the user."""

    exit_code = EXIT_RUN_FAILED


class UsageError(RobenchError):
    """Bad arguments, bad config, missing files: the user can fix the call."""

    exit_code = EXIT_USAGE


class RunError(RobenchError):
    """The run could not be completed (unreadable checkpoint, model crash, ...)."""

    exit_code = EXIT_RUN_FAILED


EXIT_INTERRUPTED = 130  # the shell's code for a run stopped by SIGINT


class Interrupted(RobenchError):
    """Ctrl-C or SIGTERM: what was finished has been saved and the run can be resumed."""

    exit_code = EXIT_INTERRUPTED


_TORCHSCRIPT_TRACE = "The following operation failed in the TorchScript interpreter"
_NAMES_ITS_TYPE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b:")


def one_line(exc: BaseException) -> str:
    """A message fit for one log line.

    TorchScript wraps a model's own exception in the interpreter's traceback; its
    last line (``builtins.RuntimeError: boom``) is the part that means something.
    """
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and _TORCHSCRIPT_TRACE in text:
        return lines[-1]
    return " ".join(lines[:3]) + (" ..." if len(lines) > 3 else "")


def describe(exc: BaseException) -> str:
    """``Type: message`` on one line, without naming the type twice."""
    message = one_line(exc)
    if not message:
        return type(exc).__name__
    return message if _NAMES_ITS_TYPE.match(message) else f"{type(exc).__name__}: {message}"
