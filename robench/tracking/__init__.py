"""Experiment tracking: finished runs logged to MLflow, and gate baselines read back from it.

``log_run(run_dir)`` logs a run folder as one MLflow run (``robench eval --track mlflow`` calls it);
``baseline_from_mlflow("mlflow:EXPERIMENT@best")`` downloads a logged run's results.json for the gate.
MLflow is the ``mlflow`` extra and is imported only when a store is used.
"""

from __future__ import annotations

from robench.tracking.mlflow_store import (BASELINE_SYNTAX, INSTALL_HINT, MLFLOW_PREFIX, FetchedBaseline,
                                           baseline_from_mlflow, check_store, experiment_name, fetch_baseline,
                                           is_mlflow_baseline, log_run, require_mlflow, store_text)

__all__ = ["BASELINE_SYNTAX", "INSTALL_HINT", "MLFLOW_PREFIX", "FetchedBaseline", "baseline_from_mlflow",
           "check_store", "experiment_name", "fetch_baseline", "is_mlflow_baseline", "log_run", "require_mlflow",
           "store_text"]
