"""The run directory every task writes into: created and locked before any work, its progress file
(what lets an interrupted run continue), the interruption message and the final files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from robench.errors import Interrupted, RunError, UsageError
from robench.evaluation import distributed
from robench.results.progress import PROGRESS_FILE, has_progress, load_progress, run_key, save_progress
from robench.results.result import Result
from robench.results.writers import prepare_run_dir


@dataclass
class RunDirectory:
    path: Path
    main: bool  # only the first process writes (torchrun)
    key: str | None = None  # the resume key; None under torchrun, where no progress file is kept
    resume_state: dict[str, Any] | None = None  # the interrupted run's progress, when there is one

    @classmethod
    def open(cls, settings: dict[str, Any], default: Callable[[], Path], *, out: Path | None = None,
             resume: Path | None = None, queued: bool = False) -> "RunDirectory":
        """Prepare (create, lock, refuse a finished run) and load the progress of an interrupted run.

        ``settings`` are what a resumed run must share with it (``Task.resume_settings``). ``queued``:
        the task keeps progress under torchrun too (its first process saves it, see
        ``robench.evaluation.work_queue``), so an elastic restart or the same command resumes the job.
        """
        if resume is not None and out is not None and resume != out:
            raise UsageError("give either --resume DIR or --out DIR")
        if resume is not None and not has_progress(resume):
            raise UsageError(f"{resume} holds no interrupted run to resume")
        rank, processes, _ = distributed.world()
        if processes > 1 and not queued and (resume is not None or (out is not None and has_progress(out))):
            raise UsageError("--resume is not available under torchrun; resume with a single process")
        if rank != 0:
            return cls(Path("."), main=False)  # under torchrun only the first process writes anything
        path = prepare_run_dir(resume or out or default())
        if processes > 1 and not queued:
            return cls(path, main=True)
        key = run_key(settings)
        return cls(path, True, key, load_progress(path, key) if has_progress(path) else None)

    def saver(self, warn: Callable[[str], None] | None = None) -> Callable[[dict], None] | None:
        """Snapshots to the progress file as the run goes; a full disk is a warning there, not the end of
        the run: the last good file stays (writes are atomic) and the results are still in memory."""
        key = self.key
        if key is None:
            return None
        warned = False

        def save(state: dict) -> None:
            nonlocal warned
            try:
                save_progress(self.path, state, key)
            except RunError as exc:
                if not warned and warn:
                    warn(str(exc))
                warned = True

        return save

    def stopped(self, partial: Result, unit: str, first: str) -> Interrupted:
        """Every task's interruption: the partial results written (first process only, and only when
        something finished or a resumed run had), and one line saying how to go on."""
        if not self.main:
            return Interrupted("interrupted")
        done = partial.doc["progress"]
        kept = self.key is not None and has_progress(self.path)
        if not done["evaluated"] and self.resume_state is None and not kept:
            return Interrupted(f"interrupted before the first {first} finished; nothing to save "
                               f"(0 of {done['total']} {unit})")
        if not done["evaluated"]:  # work is kept, but no {first} has finished everything yet
            return Interrupted(f"interrupted before the first {first} finished every attack; what the attacks "
                               f"finished is kept in {self.path}/{PROGRESS_FILE}: run the same command with "
                               f"--resume {self.path}")
        partial.save(self.path)  # the progress file, where there is one, stays for --resume
        again = (f"run the same command with --resume {self.path}" if self.key else
                 "not resumable: runs under torchrun keep no progress file")
        return Interrupted(f"interrupted after {done['evaluated']} of {done['total']} {unit}; partial results in "
                           f"{self.path}/results.json (complete: false); {again}")

    def finish(self, result: Result) -> None:
        """Write the results (first process only); a finished run needs no progress file any more."""
        if not self.main:
            return
        result.save(self.path)
        (self.path / PROGRESS_FILE).unlink(missing_ok=True)
