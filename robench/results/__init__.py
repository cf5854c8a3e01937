"""Results: the versioned JSON document, its tidy one-row-per-value form and the run-directory writers.

Names are loaded on first use (PEP 562): the light submodules (``locking``) must not pull
pandas in, as the command line's start-up would pay for it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PIXEL_SCHEMA": "robench.results.document",
    "SCHEMA": "robench.results.document",
    "TIDY_COLUMNS": "robench.results.tidy",
    "tidy_frame": "robench.results.tidy",
    "tidy_rows": "robench.results.tidy",
    "atomic_write": "robench.results.atomic",
    "default_run_dir": "robench.results.writers",
    "prepare_run_dir": "robench.results.writers",
    "write_run": "robench.results.writers",
    "InvalidDocument": "robench.results.schema",
    "schema_for": "robench.results.schema",
    "validate_document": "robench.results.schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'robench.results' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
