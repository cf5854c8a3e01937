"""Helpers shared by the test modules that drive the command line in-process."""

from __future__ import annotations

from typer.testing import CliRunner

from robench.cli import app


def invoke(*args, env=None):
    """Run ``robench ARGS`` in this process; stdout and stderr are kept apart."""
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_error_line(result, kind: str = "error") -> str:
    """A user error is exactly one line on stderr, ``robench: <kind>: ...``; returns it."""
    # A resume announces itself first; that notice is not part of the error.
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("robench: resuming")]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"robench: {kind}: "), lines[0]
    return lines[0]


def stop_after(batches: int):
    """An ``on_batch`` callback that interrupts the run (as Ctrl-C would) after ``batches`` batches."""
    seen = []

    def on_batch(n):
        seen.append(n)
        if len(seen) == batches:
            raise KeyboardInterrupt

    return on_batch
