"""Shared CLI plumbing: one-line errors, exit codes, the stderr console."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import traceback
from typing import Any, Callable, Iterator

import typer
from rich.console import Console

from robench.errors import EXIT_RUN_FAILED, Interrupted, RobenchError, describe, one_line
from robench.results.locking import release_run_dirs

stderr = Console(stderr=True, soft_wrap=True)  # log lines stay whole for grep and CI logs


def warn(message: str) -> None:
    """A warning line on stderr; markup off, as messages carry paths and labels from the user."""
    stderr.print(f"robench: warning: {message}", highlight=False, markup=False)


def stdout_console() -> Console:
    """Tables for people; when piped (CI logs, files) wide enough that no column is cut."""
    return Console() if sys.stdout.isatty() else Console(width=200)


@contextlib.contextmanager
def interrupt_on_sigterm() -> Iterator[None]:
    """Treat SIGTERM (a scheduler stopping the job) like Ctrl-C, so finished work is saved.

    Only the first signal interrupts: schedulers and impatient users send a second
    one while the partial results are being written, and that write must finish.
    """
    stopping = False

    def handler(signum, frame):
        nonlocal stopping
        if stopping:
            print("robench: already stopping; writing the partial results", file=sys.stderr)
            return
        stopping = True
        raise KeyboardInterrupt

    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not in the main thread (e.g. an embedding application): leave signals alone
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def debug() -> bool:
    return os.environ.get("ROBENCH_DEBUG", "") not in ("", "0")


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """User errors print one line and exit with their code; ROBENCH_DEBUG=1 shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Interrupted as exc:
            _report(f"robench: interrupted: {one_line(exc)}")
            raise typer.Exit(exc.exit_code) from None
        except RobenchError as exc:
            _report(f"robench: error: {one_line(exc)}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _report("robench: interrupted")
            raise typer.Exit(130) from None
        except MemoryError:
            _report("robench: run failed: out of memory")
            raise typer.Exit(EXIT_RUN_FAILED) from None
        except Exception as exc:  # noqa: BLE001 - anything else: the run could not complete
            _report(f"robench: run failed: {describe(exc)}")
            raise typer.Exit(EXIT_RUN_FAILED) from None
        finally:
            release_run_dirs()

    return wrapper


def _report(line: str) -> None:
    if debug():
        traceback.print_exc(file=sys.stderr)
    print(line, file=sys.stderr)
