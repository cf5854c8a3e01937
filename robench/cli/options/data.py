"""Which images and how they are read: the "Data" panel of ``robench eval --help``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from robench.cli.options import in_panel

PANEL = "Data"

# The same in both commands (pixel-index reads an image folder).
GRAY = typer.Option("--gray/--rgb", help="Image folders: force one or three channels (default: those of most "
                    "images; a tie gives three).")
MAX_IMAGE_PIXELS = typer.Option("--max-image-pixels", help="Image folders: skip images with more pixels "
                                "(decompression bombs; default: Pillow's limit).")

# robench eval
Data = Annotated[Optional[str], typer.Option(
    "--data", "-d", help="npz:PATH, imagefolder:PATH, example:digits, or a dataset name (mnist, fashion-mnist, "
    "cifar10, cifar100, svhn, stl10) with an optional :split. Default: the suite's dataset.", rich_help_panel=PANEL)]
Limit = Annotated[Optional[int], typer.Option("--limit", help="Evaluate a fixed subset of N samples.",
                                              rich_help_panel=PANEL)]
DataRoot = Annotated[Optional[str], typer.Option("--data-root", help="Where torchvision datasets live.",
                                                 rich_help_panel=PANEL)]
Download = Annotated[bool, typer.Option("--download", help="Download torchvision datasets if missing.",
                                        rich_help_panel=PANEL)]
Split = Annotated[str, typer.Option("--split", help="Dataset split for torchvision datasets.", rich_help_panel=PANEL)]
Resize = Annotated[Optional[int], typer.Option(
    "--resize", help="Resize image folders (shorter side) before cropping (default: a model by name's own resize).",
    rich_help_panel=PANEL)]
Crop = Annotated[Optional[int], typer.Option(
    "--crop", help="Centre-crop image folders to this size (default: a model by name's own crop).",
    rich_help_panel=PANEL)]
Gray = Annotated[Optional[bool], in_panel(GRAY, PANEL)]
MaxImagePixels = Annotated[Optional[int], in_panel(MAX_IMAGE_PIXELS, PANEL)]
Workers = Annotated[int, typer.Option("--workers", help="DataLoader worker processes for file-based datasets.",
                                      rich_help_panel=PANEL)]

# robench pixel-index
# readable=False: robench checks access itself and names the OS reason in one line
Folder = Annotated[Path, typer.Argument(readable=False,
                                        help="Images: class sub-folders (labels) or a flat folder.")]
InputSize = Annotated[Optional[int], typer.Option(
    "--input-size", help="Resize the shorter side to N/0.875 and centre-crop N.")]
PixelResize = Annotated[Optional[int], typer.Option("--resize", help="Resize the shorter side to this size.")]
PixelCrop = Annotated[Optional[int], typer.Option("--crop", help="Centre-crop to this size.")]
ClassMap = Annotated[Optional[str], typer.Option("--class-map", help="Folder name -> class index (JSON or text).")]
PixelGray = Annotated[Optional[bool], GRAY]
PixelMaxImagePixels = Annotated[Optional[int], MAX_IMAGE_PIXELS]
