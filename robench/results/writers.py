"""Write a run directory: results.json, results.csv, samples.csv, config.json."""

from __future__ import annotations

import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from robench.errors import UsageError
from robench.results.atomic import atomic_write
from robench.results.locking import lock_run_dir
from robench.results.schema import check_before_writing
from robench.results.tidy import tidy_frame


def default_run_dir(suite: str, model: str, base: str = "runs") -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    root = Path(base) / _safe(suite) / _safe(model)
    path = root / stamp
    n = 1
    # mkdir claims the name atomically: two runs started in the same second get two directories.
    while not _claim(path):  # never overwrite an earlier run
        path = root / f"{stamp}-{n}"
        n += 1
    return path


_claimed: set[Path] = set()  # directories default_run_dir made: still "fresh" for prepare_run_dir


def _claim(path: Path) -> bool:
    try:
        path.mkdir(parents=True)
    except FileExistsError:
        return False
    except OSError as exc:
        raise UsageError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    _claimed.add(path.resolve())
    return True


def default_train_dir(recipe: str, base: str = "runs") -> Path:
    """``runs/train/RECIPE``: one fixed folder per recipe (no time stamp), so a killed run resumes there."""
    return Path(base) / "train" / _safe(recipe)


def _safe(name: str) -> str:
    """One plain folder name: other characters become "_"; "." and ".." would name this folder or its
    parent, so a name made only of dots becomes underscores."""
    cleaned = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return cleaned if cleaned.strip(".") else cleaned.replace(".", "_") or "model"


def _finished_results(path: Path) -> str | None:
    """An evaluation run is complete once results.json is, or when it has no progress to resume."""
    from robench.results.progress import finished, has_progress

    if (path / "results.json").exists() and (finished(path) or not has_progress(path)):
        return "results.json"
    return None


def prepare_run_dir(path: Path, complete: Callable[[Path], str | None] = _finished_results) -> Path:
    """Create and lock the run directory before any work, so a second run or a read-only place fails now.

    ``complete`` says what in the directory marks a finished run (``robench train``: a model without a
    resume state), or None: that run is refused, never overwritten.
    """
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} is a file, not a directory")
    fresh = not path.exists() or path.resolve() in _claimed
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {path}: {exc.strerror or exc}") from None
    lock_run_dir(path, fresh=fresh)
    # Checked under the lock: another run cannot finish in between.
    found = complete(path)
    if found:
        raise UsageError(f"{path} already holds {found}; choose another --out (runs are never overwritten)")
    return path


def command_line() -> str:
    """The command that started this process, as a user would type it again."""
    argv = sys.argv or [""]
    if Path(argv[0]).name == "robench":  # the console script: its interpreter line is noise
        return shlex.join(["robench", *argv[1:]])
    return shlex.join(getattr(sys, "orig_argv", None) or argv)  # e.g. python3 -m robench eval ...


def write_results(path: Path, doc: dict[str, Any], tidy: pd.DataFrame, config: dict[str, Any]) -> None:
    """config.json, results.csv, then results.json last: its presence means the rest is there.

    config.json also records the command line (``robench report`` shows it); results.json does not,
    so that the document depends only on what was evaluated, not on how the process was started.
    With ``ROBENCH_CHECK_SCHEMA=1`` the document is validated against its JSON Schema first.
    """
    check_before_writing(doc)
    config = {**config, "command": config.get("command") or command_line()}
    atomic_write(path / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    atomic_write(path / "results.csv", tidy.to_csv(index=False))
    atomic_write(path / "results.json", json.dumps(doc, indent=2) + "\n")


def write_run(path: Path, doc: dict[str, Any], samples: pd.DataFrame | None, config: dict[str, Any]) -> None:
    """A run's files: samples.csv (where the task has a per-sample table), then ``write_results``."""
    if samples is not None:
        atomic_write(path / "samples.csv", samples.to_csv(index=False))
    write_results(path, doc, tidy_frame(doc), config)
