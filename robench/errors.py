"""Error types that map to the CLI's exit codes.

A user sees one line for these; ``ROBENCH_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

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
