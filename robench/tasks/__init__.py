"""Tasks: what a run computes — classification, re-identification, Pixel-index — each the same way.

A task is built from a validated config (the command line and the Python API build the same
one), says what a resumed run must share with the interrupted one (``resume_settings``) and
where it writes by default (``default_dir``), and ``run``s into a ``RunDirectory`` (or none,
from Python), returning a ``robench.results.result.Result``. Everything around the computation
— the folder (confined, locked, never overwritten), the progress file, the interruption
message and the final write — is the run directory's, shared by every task.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from robench.errors import UsageError

if TYPE_CHECKING:
    from robench.results.result import Result
    from robench.tasks.rundir import RunDirectory


def normalize_option(options: dict[str, Any], normalization: Any = None) -> dict[str, Any]:
    """``options`` with the Python API's ``normalization`` (an argument, or among ``options``) given as
    ``normalize``, the name the configs read; both at once is a usage error."""
    options = dict(options)
    normalization = options.pop("normalization", normalization)
    if normalization is not None:
        if options.get("normalize") is not None:
            raise UsageError("give either normalization or normalize, not both")
        options["normalize"] = normalization
    return options


def refuse_output_options(entry: str, options: dict[str, Any]) -> None:
    """A task's Python entry returns the Result and writes nothing: ``out`` and ``resume`` are the CLI's."""
    for name in ("out", "resume"):
        if options.get(name) is not None:
            raise UsageError(f"{entry} returns the Result and writes nothing: save it with result.save(DIR) "
                             f"instead of passing {name}")


@dataclass(frozen=True)
class Hooks:
    """How a run reports as it goes; every hook is optional and none changes a result."""

    on_batch: Callable[[int], None] | None = None  # samples (or images) finished
    progress: Any = None  # a progress display (see robench.evaluation.engine.ProgressSink)
    on_step: Callable[[str], None] | None = None  # a line per stage (ReID)
    on_warning: Callable[[str], None] | None = None  # problems that do not stop the run


class Task(Protocol):
    name: str  # classification, reid or pixel-index: results.json's ``task``

    def resume_settings(self) -> dict[str, Any]:
        """Everything that must be identical for a resumed run to equal an uninterrupted one."""
        ...

    def default_dir(self) -> Path:
        """The run directory when none is given (``runs/...``, claimed, never reused)."""
        ...

    def run(self, directory: "RunDirectory | None", hooks: Hooks) -> "Result":
        """Compute; an interruption raises ``robench.errors.Interrupted`` after saving what finished."""
        ...
