"""The certification's own options (``robench certify``): the noise, the copies, the confidence and the radii."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

PANEL = "Randomized smoothing"

Sigma = Annotated[Optional[str], typer.Option(
    "--sigma", metavar="S", help="Standard deviation of the Gaussian noise, in [0,1] pixel units (required; e.g. "
    "0.25). Added before the model's normalisation, not clamped.", show_default=False, rich_help_panel=PANEL)]
SelectionCopies = Annotated[int, typer.Option(
    "--n0", "--selection-copies", help="Noisy copies per sample that select the class to certify.",
    rich_help_panel=PANEL)]
# Under torchrun, whose own parser takes --n for an abbreviation of its options, the long name is needed.
EstimationCopies = Annotated[int, typer.Option(
    "--n", "--estimation-copies", help="Noisy copies per sample that bound the selected class's probability (and "
    "that PREDICT counts); under torchrun write --estimation-copies.", rich_help_panel=PANEL)]
Alpha = Annotated[float, typer.Option(
    "--alpha", help="Failure probability per sample: each certificate holds with probability at least 1 - alpha.",
    rich_help_panel=PANEL)]
Radii = Annotated[str, typer.Option(
    "--radii", help="L2 radii (pixel units) at which the certified accuracy is reported, comma-separated.",
    rich_help_panel=PANEL)]
CertifyBatchSize = Annotated[int, typer.Option(
    "--batch-size", "-b", help="Noisy copies per forward pass (copies of consecutive samples share a pass).",
    rich_help_panel="Speed and precision")]
CertifySeed = Annotated[int, typer.Option(
    "--seed", help="Seed of the noise: each copy's draw is keyed by it, the sample's index and the copy's number.",
    rich_help_panel=PANEL)]
CertifyData = Annotated[Optional[str], typer.Option(
    "--data", "-d", help="npz:PATH, imagefolder:PATH, example:digits, or a dataset name (mnist, fashion-mnist, "
    "cifar10, cifar100, svhn, stl10) with an optional :split. Required, but for example:digits, which brings its "
    "own.", rich_help_panel="Data")]
