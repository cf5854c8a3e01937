"""The experiments of ``robench pixel-index``: how many pixels change, how, and how often."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Pixels = Annotated[str, typer.Option("--pixels", help="Pixel counts to change, comma-separated.")]
Delta = Annotated[Optional[str], typer.Option(
    "--delta", help="Experiment 2: offsets within ±delta, e.g. 10,40,70,100,127.")]
Area = Annotated[Optional[str], typer.Option("--area", help="Experiment 3: centred areas, e.g. 200,150 or 200x150.")]
Trials = Annotated[int, typer.Option("--trials",
                                     help="Independent draws per setting; mean and spread are reported.")]
PixelSeed = Annotated[int, typer.Option("--seed", help="Seed of the per-image random streams.")]
SharedPositions = Annotated[bool, typer.Option(
    "--shared-positions", help="One position list for all images (the paper's Algorithm 1).")]
Channels = Annotated[str, typer.Option("--channels", help="Channels of a chosen pixel that change: all or first.")]
OnAttack = Annotated[Optional[str], typer.Option("--on-attack", help="Experiment 4: fgsm.")]
PixelEps = Annotated[Optional[str], typer.Option("--eps",
                                                 help="Eps of --on-attack, in [0,1] pixel units (e.g. 8/255).")]
