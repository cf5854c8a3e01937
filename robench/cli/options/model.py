"""Which model, its weights and its preprocessing: the "Model" panel of ``robench eval --help``."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from robench.cli.options import in_panel

PANEL = "Model"

# The same in both commands.
ARCH = typer.Option("--arch", help="Architecture for state dicts: torchvision:NAME or module:factory.")
NUM_CLASSES = typer.Option("--num-classes", help="Passed to the architecture factory.")
TRUST_CHECKPOINT = typer.Option("--trust-checkpoint", help="Allow unpickling full Python objects and TorchScript "
                                "programs (runs code from the file).")
MEAN = typer.Option("--mean", help="Per-channel mean, e.g. '0.485,0.456,0.406'.")
STD = typer.Option("--std", help="Per-channel std.")

# robench eval
Model = Annotated[str, typer.Argument(
    help="Checkpoint file (TorchScript, .pt/.pth, .safetensors), example:digits, or a model by name with its "
    "preprocessing: timm:NAME, torchvision:NAME:WEIGHTS (e.g. torchvision:resnet50:IMAGENET1K_V2), hf:ORG/NAME "
    "(a timm model on the Hugging Face hub), robustbench:NAME.")]
Arch = Annotated[Optional[str], in_panel(ARCH, PANEL)]
NumClasses = Annotated[Optional[int], in_panel(NUM_CLASSES, PANEL)]
Weights = Annotated[Optional[str], typer.Option(
    "--weights", help="timm:NAME / torchvision:NAME: load this local weights file (state dict or .safetensors) "
    "instead of downloading; classes from the file or --num-classes.", rich_help_panel=PANEL)]
Dataset = Annotated[Optional[str], typer.Option(
    "--dataset", help="robustbench: models: the dataset they were trained on, cifar10 (default), cifar100 or "
    "imagenet.", rich_help_panel=PANEL)]
ThreatModel = Annotated[Optional[str], typer.Option(
    "--threat-model", help="robustbench: models: Linf (default), L2 or corruptions.", rich_help_panel=PANEL)]
ModelDir = Annotated[Optional[str], typer.Option(
    "--model-dir", help="robustbench: models: where their checkpoints are kept (default: models).",
    rich_help_panel=PANEL)]
TrustCheckpoint = Annotated[bool, in_panel(TRUST_CHECKPOINT, PANEL)]
Normalize = Annotated[Optional[str], typer.Option(
    "--normalize", help="Preset: imagenet, cifar10, cifar100, mnist, fashion-mnist, none. Models by name bring "
    "their own mean/std; this (or --mean/--std) replaces it.", rich_help_panel=PANEL)]
Mean = Annotated[Optional[str], in_panel(MEAN, PANEL)]
Std = Annotated[Optional[str], in_panel(STD, PANEL)]

# robench pixel-index
PixelModel = Annotated[str, typer.Argument(
    help="Checkpoint file, example:digits, or a model by name with its preprocessing: timm:NAME, "
    "torchvision:NAME:WEIGHTS, hf:ORG/NAME, robustbench:NAME.")]
PixelArch = Annotated[Optional[str], ARCH]
PixelNumClasses = Annotated[Optional[int], NUM_CLASSES]
PixelWeights = Annotated[Optional[str], typer.Option(
    "--weights", help="timm:NAME / torchvision:NAME: a local weights file instead of a download.")]
PixelDataset = Annotated[Optional[str], typer.Option("--dataset", help="robustbench: cifar10, cifar100 or imagenet.")]
PixelThreatModel = Annotated[Optional[str], typer.Option("--threat-model",
                                                         help="robustbench: Linf, L2 or corruptions.")]
PixelModelDir = Annotated[Optional[str], typer.Option("--model-dir",
                                                      help="robustbench: checkpoint folder (default: models).")]
PixelTrustCheckpoint = Annotated[bool, TRUST_CHECKPOINT]
PixelNormalize = Annotated[Optional[str], typer.Option(
    "--normalize", "--preset", help="imagenet, cifar10, ... (replaces the mean/std a model by name brings).")]
PixelMean = Annotated[Optional[str], MEAN]
PixelStd = Annotated[Optional[str], STD]
