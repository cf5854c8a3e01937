"""The progress file of a run: what lets an interrupted run continue where it stopped."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import torch

from robench.errors import UsageError
from robench.results.atomic import write_file_atomically

PROGRESS_FILE = "progress.pt"


def run_key(settings: dict[str, Any]) -> str:
    """Everything that must be identical for a resumed run to equal an uninterrupted one."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def save_progress(run_dir: Path, state: dict[str, Any], key: str) -> None:
    # Serialised in memory first: torch.save on a full disk reports a cryptic stream
    # position error, a plain write names the disk. The rename keeps it atomic.
    buffer = io.BytesIO()
    torch.save({**state, "run_key": key}, buffer)
    write_file_atomically(run_dir / PROGRESS_FILE, buffer.getvalue())


def load_progress(run_dir: Path, key: str) -> dict[str, Any]:
    path = run_dir / PROGRESS_FILE
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot resume from {path}: {exc}") from exc
    if not isinstance(state, dict) or state.get("run_key") != key:
        raise UsageError(f"cannot resume {run_dir}: the model, data, suite or options differ from the "
                         "interrupted run's; use the same command, or another --out")
    return state


def has_progress(run_dir: Path) -> bool:
    return (run_dir / PROGRESS_FILE).is_file()


def finished(run_dir: Path) -> bool:
    """A complete results.json (an interrupted run writes one marked incomplete)."""
    from robench.files import read_bounded_text
    from robench.results.reading import MAX_RESULT_BYTES

    path = run_dir / "results.json"
    if not path.is_file():
        return False
    try:
        doc = json.loads(read_bounded_text(path, "results.json", MAX_RESULT_BYTES))
        return not isinstance(doc, dict) or doc.get("complete", True) is not False
    except (UsageError, ValueError, RecursionError):
        return True  # unreadable or too large: never overwrite it
