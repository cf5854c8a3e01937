"""Where and how fast the work runs: the "Speed and precision" panel of ``robench eval --help``."""

from __future__ import annotations

from typing import Annotated

import typer

from robench.cli.options import in_panel

PANEL = "Speed and precision"

# The same in both commands.
DEVICE = typer.Option("--device", help="auto, cpu, cuda or cuda:N.")

# robench eval
Device = Annotated[str, in_panel(DEVICE, PANEL)]
BatchSize = Annotated[str, typer.Option(
    "--batch-size", "-b", help="Images per batch, or auto (the largest that fits on the GPU; 256 on a CPU).",
    rich_help_panel=PANEL)]
Precision = Annotated[str, typer.Option("--precision", help="fp32, tf32, bf16 or fp16 (recorded in the results).",
                                        rich_help_panel=PANEL)]
Compile = Annotated[str, typer.Option(
    "--compile", help="Faster passes: torch.compile on a GPU, TorchScript's frozen graph for the queries on a "
    "CPU. on, off, or auto (runs with enough work to pay for it).", rich_help_panel=PANEL)]
ChannelsLast = Annotated[bool, typer.Option("--channels-last", help="NHWC memory format for convolutions.",
                                            rich_help_panel=PANEL)]
Refill = Annotated[bool, typer.Option(
    "--refill/--no-refill", help="Continuous batching: slots of fooled or finished samples go to the next ones "
    "(the same results, faster).", rich_help_panel=PANEL)]

# robench pixel-index
PixelDevice = Annotated[str, DEVICE]
PixelBatchSize = Annotated[int, typer.Option("--batch-size", "-b", help="Images per forward pass.")]
