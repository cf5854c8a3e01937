"""Which attacks, at which budgets: the "Suite and attacks" panel of ``robench eval --help``."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer

PANEL = "Suite and attacks"

Suite = Annotated[str, typer.Option("--suite", "-s", help="Built-in suite name or YAML path.", rich_help_panel=PANEL)]
Eps = Annotated[Optional[str], typer.Option(
    "--eps", help="Run every suite entry that has an eps at this one instead: a value as in suites (8/255, 0.03) "
    "or a comma-separated sweep (2/255,4/255,8/255). Recorded in the results.", rich_help_panel=PANEL)]
Norm = Annotated[Optional[str], typer.Option(
    "--norm", help="Run those entries under this norm instead: linf or l2. Recorded in the results.",
    rich_help_panel=PANEL)]
Bpda = Annotated[Optional[str], typer.Option(
    "--bpda", metavar="NAME[,NAME...]", help="BPDA: every gradient attack differentiates through these modules of "
    "the model (names as model.named_modules() gives them, e.g. transform) as if they were the identity, while "
    "forward values stay exact. For non-differentiable defences (JPEG, quantisation). Recorded in the results.",
    rich_help_panel=PANEL)]
TrustSuite = Annotated[bool, typer.Option(
    "--trust-suite", help="Allow a suite to import Python code (module:factory architectures, plugins:).",
    rich_help_panel=PANEL)]
Plugin = Annotated[Optional[List[str]], typer.Option(
    "--plugin", help="Import MODULE first: it registers attacks (robench.register_attack). Repeatable.",
    rich_help_panel=PANEL)]
SweepReuse = Annotated[bool, typer.Option(
    "--sweep-reuse", help="Any-iterate eps sweeps: a sample fooled at a smaller eps is not attacked again at a "
    "larger one.", rich_help_panel=PANEL)]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the per-sample random streams (random starts).",
                                   rich_help_panel=PANEL)]
