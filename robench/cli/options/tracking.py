"""Logging the finished run to an experiment tracker: the "Tracking" panel of ``robench eval --help``, the
same two options in ``robench pixel-index``. Only the command line reads these; the evaluation never sees them."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from robench.cli.options import in_panel

PANEL = "Tracking"

TRACK = typer.Option(
    "--track", metavar="mlflow[:URI]", help="Log the finished run to MLflow: settings, metrics, results files, the "
    "HTML report and example grids (needs robench's mlflow extra). URI: the tracking store (default: "
    "MLFLOW_TRACKING_URI, else MLflow's default).")
TRACK_EXPERIMENT = typer.Option(
    "--track-experiment", metavar="NAME", help="With --track: the MLflow experiment (default: "
    "MLFLOW_EXPERIMENT_NAME, else robench); created if missing.")

# robench eval
Track = Annotated[Optional[str], in_panel(TRACK, PANEL)]
TrackExperiment = Annotated[Optional[str], in_panel(TRACK_EXPERIMENT, PANEL)]

# robench pixel-index
PixelTrack = Annotated[Optional[str], TRACK]
PixelTrackExperiment = Annotated[Optional[str], TRACK_EXPERIMENT]
