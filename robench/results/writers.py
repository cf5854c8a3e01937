"""Write a run directory: results.json, results.csv, samples.csv, config.json."""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from robench.errors import UsageError
from robench.results.schema import TIDY_COLUMNS, tidy_rows


def default_run_dir(suite: str, model: str, base: str = "runs") -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    root = Path(base) / _safe(suite) / _safe(model)
    path = root / stamp
    n = 1
    while path.exists():  # never overwrite an earlier run
        path = root / f"{stamp}-{n}"
        n += 1
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "model"


def prepare_run_dir(path: Path) -> Path:
    from robench.results.progress import finished, has_progress

    if (path / "results.json").exists() and (finished(path) or not has_progress(path)):
        raise UsageError(f"{path} already holds results.json; choose another --out (runs are never overwritten)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create output directory {path}: {exc}") from exc
    return path


def atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(path: Path, doc: dict[str, Any], tidy: pd.DataFrame, config: dict[str, Any]) -> None:
    """config.json, results.csv, then results.json last: its presence means the rest is there."""
    atomic_write(path / "config.json", json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    atomic_write(path / "results.csv", tidy.to_csv(index=False))
    atomic_write(path / "results.json", json.dumps(doc, indent=2) + "\n")


def write_run(path: Path, doc: dict[str, Any], samples: pd.DataFrame, config: dict[str, Any]) -> None:
    atomic_write(path / "samples.csv", samples.to_csv(index=False))
    write_results(path, doc, pd.DataFrame(tidy_rows(doc), columns=TIDY_COLUMNS), config)
