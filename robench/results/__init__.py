"""Results: the versioned JSON document, its tidy one-row-per-value form and the run-directory writers."""

from robench.results.document import PIXEL_SCHEMA, SCHEMA
from robench.results.tidy import TIDY_COLUMNS, tidy_frame, tidy_rows
from robench.results.writers import atomic_write, default_run_dir, prepare_run_dir, write_run

__all__ = ["PIXEL_SCHEMA", "SCHEMA", "TIDY_COLUMNS", "atomic_write", "default_run_dir", "prepare_run_dir",
           "tidy_frame", "tidy_rows", "write_run"]
