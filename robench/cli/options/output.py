"""Where the results go and what is printed: the "Output and resume" panel of ``robench eval --help``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from robench.cli.options import in_panel

PANEL = "Output and resume"

# The same in both commands.
RESUME = typer.Option("--resume", help="Continue the interrupted run in this directory.")
SAVE_EVERY = typer.Option("--save-every", help="Seconds between progress saves (0: every batch).")
JSON = typer.Option("--json", help="Print only the results JSON to stdout.")

# robench eval
Out = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="Run directory (default runs/<suite>/<model>/<UTC time>/); an interrupted run there is "
    "continued.", rich_help_panel=PANEL)]
Resume = Annotated[Optional[Path], in_panel(RESUME, PANEL)]
SaveEvery = Annotated[float, in_panel(SAVE_EVERY, PANEL)]
SaveAdversarial = Annotated[Optional[str], typer.Option(
    "--save-adversarial", metavar="[N|all]", help="Save the first N samples' adversarial examples (alone or all: "
    "every sample) as 8-bit images in adversarial/<entry>.npz, with a PNG grid per entry.", rich_help_panel=PANEL)]
Json = Annotated[bool, in_panel(JSON, PANEL)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.", rich_help_panel=PANEL)]

# robench pixel-index
PixelOut = Annotated[Optional[Path], typer.Option(
    "--out", "-o", help="Run directory (default runs/pixel-index/<model>/<UTC time>/); an interrupted run there "
    "is continued.")]
PixelResume = Annotated[Optional[Path], RESUME]
PixelSaveEvery = Annotated[float, SAVE_EVERY]
PixelSaveAdversarial = Annotated[Optional[str], typer.Option(
    "--save-adversarial", metavar="[N|all]", help="Save the first N images (alone or all: every image) as changed "
    "by the first trial, per setting and pixel count, in adversarial/<setting>.npz with a PNG grid.")]
PixelJson = Annotated[bool, JSON]
PixelQuiet = Annotated[bool, typer.Option("--quiet", "-q", help="Do not print where the results were written.")]
