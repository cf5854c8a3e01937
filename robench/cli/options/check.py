"""The attack check's own options (``robench check-attack``): how many problems, and how they are built."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

PANEL = "Attack check"

Samples = Annotated[int, typer.Option(
    "--samples", help="Test problems: one per clean-correct sample, the first ones more than two radii apart.",
    rich_help_panel=PANEL)]
InnerPoints = Annotated[int, typer.Option(
    "--inner-points", help="Random points inside the ball per problem (the paper's 999).", rich_help_panel=PANEL)]
Readout = Annotated[Optional[str], typer.Option(
    "--readout", metavar="MODULE", help="The nn.Linear whose input are the features (default: the model's last).",
    rich_help_panel=PANEL)]
PassThreshold = Annotated[float, typer.Option(
    "--pass-threshold", help="The share of problems an attack must solve to pass.", rich_help_panel=PANEL)]
