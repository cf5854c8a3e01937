"""Results: the versioned JSON document, tidy rows and the run-directory writers."""

from robench.results.schema import SCHEMA, TIDY_COLUMNS, tidy_rows
from robench.results.writers import atomic_write, default_run_dir, prepare_run_dir, write_run

__all__ = ["SCHEMA", "TIDY_COLUMNS", "atomic_write", "default_run_dir", "prepare_run_dir", "tidy_rows", "write_run"]
