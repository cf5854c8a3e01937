"""``robench check-attack MODEL --suite NAME``: is each attack of the suite strong enough for this model?"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from robench.cli.common import handle_errors, interrupt_on_sigterm, stderr, stdout_console, warn
from robench.cli.options import config_options
from robench.cli.options.check import InnerPoints, PassThreshold, Readout, Samples
from robench.cli.options.data import Data, DataRoot, Download, Limit, Split
from robench.cli.options.engine import BatchSize, Device, Precision
from robench.cli.options.model import Arch, Mean, Model, Normalize, NumClasses, Std, TrustCheckpoint, Weights
from robench.cli.options.output import Json, Out, Quiet, Resume
from robench.cli.options.suite import Eps, Norm, Plugin, Seed, Suite, TrustSuite


@handle_errors
def check_command(
    model: Model,
    suite: Suite = "pgd-linf",
    eps: Eps = None,
    norm: Norm = None,
    data: Data = None,
    samples: Samples = 50,
    inner_points: InnerPoints = 999,
    readout: Readout = None,
    pass_threshold: PassThreshold = 0.95,
    arch: Arch = None,
    num_classes: NumClasses = None,
    weights: Weights = None,
    trust_checkpoint: TrustCheckpoint = False,
    trust_suite: TrustSuite = False,
    plugin: Plugin = None,
    normalize: Normalize = None,
    mean: Mean = None,
    std: Std = None,
    device: Device = "auto",
    batch_size: BatchSize = "256",
    precision: Precision = "fp32",
    seed: Seed = 0,
    limit: Limit = None,
    data_root: DataRoot = None,
    download: Download = False,
    split: Split = "test",
    out: Out = None,
    resume: Resume = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Check that each attack of a suite is strong enough for MODEL: the binarization test.

    Per point: a two-class problem on the model's features, solvable within eps.
    An attack solving fewer than --pass-threshold of them is too weak here.
    Exit 0: every checked attack passed. Exit 1: an attack failed.
    """
    options = config_options(locals(), ("as_json", "quiet"))  # first: before the body binds any other name
    options["plugins"] = tuple(options.pop("plugin") or ())
    from robench.results.attack_check import verdict_line
    from robench.tasks import Hooks
    from robench.tasks.attack_check import AttackCheckConfig, AttackCheckTask
    from robench.tasks.run import open_run_directory

    config = AttackCheckConfig.of(**options)
    task = AttackCheckTask(config)
    directory = open_run_directory(task, config.evaluation.output.out, config.evaluation.output.resume)
    if directory.resume_state is not None:
        stderr.print(f"robench: resuming {directory.path}", highlight=False)
    steps = None if quiet else (lambda line: stderr.print(f"robench: {line}", highlight=False))
    with interrupt_on_sigterm():
        result = task.run(directory, Hooks(on_step=steps, on_warning=warn))
    directory.finish(result)
    _print(result.doc, as_json)
    if not quiet:
        stderr.print(f"results written to {directory.path}", highlight=False)
    if result.doc["verdict"] == "failed":
        if not as_json:
            stderr.print(f"robench: {verdict_line(result.doc)}", highlight=False)
        raise typer.Exit(1)


def _print(doc: dict[str, Any], as_json: bool) -> None:
    from rich.table import Table

    from robench.results.attack_check import verdict_line

    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    table = Table(title=f"Attack check: {doc['suite']['name']} on {doc['model']['name']}")
    for column in ("attack", "norm", "eps", "problems", "solved", "pass rate", "random", "verdict"):
        table.add_column(column, justify="left" if column in ("attack", "norm", "verdict") else "right")
    for check in doc["checks"]:
        rate = check["pass_rate"]
        verdict = check["verdict"] + (f" ({check['reason']})" if check.get("reason") else "")
        table.add_row(check["label"], check["norm"], check["eps_text"] or "-", str(check["problems"]),
                      str(check["solved"]), "-" if rate is None else f"{100 * rate:.1f}%", str(check["trivial"]),
                      verdict)
    console = stdout_console()
    console.print(table)
    console.print(verdict_line(doc), highlight=False)
