"""Re-identification (market1501:, dukemtmc:, reid: datasets): the "Re-identification" panel of
``robench eval --help``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

PANEL = "Re-identification"

FeatureLayer = Annotated[Optional[str], typer.Option("--feature-layer", help="ReID: take features from this module.",
                                                     rich_help_panel=PANEL)]
Flip = Annotated[bool, typer.Option("--flip", help="ReID: add the features of the flipped image.",
                                    rich_help_panel=PANEL)]
L2 = Annotated[bool, typer.Option("--l2", help="ReID: L2-normalise features.", rich_help_panel=PANEL)]
Distance = Annotated[str, typer.Option("--distance", help="ReID: euclidean or cosine.", rich_help_panel=PANEL)]
Ranks = Annotated[str, typer.Option("--ranks", help="ReID: CMC ranks.", rich_help_panel=PANEL)]
Ap = Annotated[str, typer.Option(
    "--ap", help="ReID: AP convention, noninterp (torchreid) or trapezoid (Market-1501 MATLAB code).",
    rich_help_panel=PANEL)]
Denominator = Annotated[str, typer.Option(
    "--denominator", help="ReID: queries without a valid match are skipped (valid) or count as 0 (all).",
    rich_help_panel=PANEL)]
Rerank = Annotated[bool, typer.Option("--rerank", help="ReID: also report k-reciprocal re-ranking.",
                                      rich_help_panel=PANEL)]
Perturb = Annotated[str, typer.Option("--perturb", help="ReID: which split attacks perturb, query or gallery.",
                                      rich_help_panel=PANEL)]
Surrogate = Annotated[Optional[str], typer.Option("--surrogate", help="ReID: model for transfer attacks.",
                                                  rich_help_panel=PANEL)]
SurrogateArch = Annotated[Optional[str], typer.Option(
    "--surrogate-arch", help="ReID: architecture of a state-dict surrogate (as --arch).", rich_help_panel=PANEL)]
SurrogateNumClasses = Annotated[Optional[int], typer.Option(
    "--surrogate-num-classes", help="ReID: passed to the surrogate's architecture factory.", rich_help_panel=PANEL)]
ImageSize = Annotated[Optional[str], typer.Option("--image-size", help="ReID: resize images to HxW, e.g. 256x128.",
                                                  rich_help_panel=PANEL)]
ReidPattern = Annotated[Optional[str], typer.Option(
    "--reid-pattern", help="ReID: filename regex with groups (person id, camera).", rich_help_panel=PANEL)]
