"""Gating the run against a baseline in the same step: the "CI gate (with --baseline)" panel of
``robench eval --help``. Only the command line reads these; the evaluation never sees them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

PANEL = "CI gate (with --baseline)"

Baseline = Annotated[Optional[str], typer.Option(
    "--baseline", help="Gate the results against this run (exit 1 on a regression): a run directory, its "
    "results.json, or a run logged to MLflow: mlflow:EXPERIMENT, mlflow:EXPERIMENT@RUN_ID or @best (read from "
    "--track's store, else MLFLOW_TRACKING_URI's).", rich_help_panel=PANEL)]
MaxDrop = Annotated[float, typer.Option("--max-drop", help="With --baseline: allowed drop (0.01 = 1 point).",
                                        rich_help_panel=PANEL)]
Rule = Annotated[Optional[List[str]], typer.Option("--rule", help="With --baseline: METRIC@ENTRY:THRESHOLD.",
                                                   rich_help_panel=PANEL)]
RequireSignificant = Annotated[bool, typer.Option(
    "--require-significant", help="With --baseline: fail only on drops beyond 1.96 standard errors.",
    rich_help_panel=PANEL)]
Junit = Annotated[Optional[Path], typer.Option("--junit", help="With --baseline: JUnit XML report.",
                                               rich_help_panel=PANEL)]
Metric = Annotated[Optional[List[str]], typer.Option(
    "--metric", help="With --baseline: metrics to gate (default: the accuracy metrics; e.g. "
    "accuracy,robust_accuracy,success_rate).", rich_help_panel=PANEL)]
AllowFlag = Annotated[Optional[List[str]], typer.Option(
    "--allow-flag", help="With --baseline: a sanity flag that may pass the gate (e.g. gradient_masking), or 'all'.",
    rich_help_panel=PANEL)]
