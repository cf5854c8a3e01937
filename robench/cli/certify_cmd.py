"""``robench certify MODEL --sigma S``: certified L2 accuracy by randomized smoothing."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from rich.console import Console

from robench.cli.common import handle_errors, interrupt_on_sigterm, stderr, stdout_console, warn
from robench.cli.options import config_options
from robench.cli.options.certify import Alpha, CertifyBatchSize, CertifyData, CertifySeed, EstimationCopies, Radii, \
    SelectionCopies, Sigma
from robench.cli.options.data import Crop, DataRoot, Download, Gray, Limit, MaxImagePixels, Resize, Split
from robench.cli.options.engine import Device
from robench.cli.options.model import Arch, Dataset, Mean, Model, ModelDir, Normalize, NumClasses, Std, \
    ThreatModel, TrustCheckpoint, Weights
from robench.cli.options.output import Json, Out, Quiet, Resume, SaveEvery

PLAIN_EVERY_SECONDS = 30.0  # progress lines in logs: one every half minute


@handle_errors
def certify_command(
    model: Model,
    sigma: Sigma = None,
    n0: SelectionCopies = 100,
    n: EstimationCopies = 100_000,
    alpha: Alpha = 0.001,
    radii: Radii = "0,0.25,0.5,0.75,1.0",
    data: CertifyData = None,
    arch: Arch = None,
    num_classes: NumClasses = None,
    weights: Weights = None,
    dataset: Dataset = None,
    threat_model: ThreatModel = None,
    model_dir: ModelDir = None,
    trust_checkpoint: TrustCheckpoint = False,
    normalize: Normalize = None,
    mean: Mean = None,
    std: Std = None,
    device: Device = "auto",
    batch_size: CertifyBatchSize = 1000,
    seed: CertifySeed = 0,
    limit: Limit = None,
    data_root: DataRoot = None,
    download: Download = False,
    split: Split = "test",
    resize: Resize = None,
    crop: Crop = None,
    gray: Gray = None,
    max_image_pixels: MaxImagePixels = None,
    out: Out = None,
    resume: Resume = None,
    save_every: SaveEvery = 2.0,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Certified accuracy of MODEL smoothed with Gaussian noise (Cohen, Rosenfeld & Kolter, 2019).

    Per sample: the smoothed classifier's class and a certified L2 radius
    (holding with probability at least 1 - alpha), or an abstention.
    """
    options = config_options(locals(), ("as_json", "quiet"))  # first: before the body binds any other name
    # Imported here, not at the top: building the command line (--help) must not load torch.
    from robench.tasks import Hooks
    from robench.tasks.certify import CertifyConfig, CertifyTask
    from robench.tasks.run import open_run_directory

    config = CertifyConfig.of(**options)
    task = CertifyTask(config)
    directory = open_run_directory(task, config.output.out, config.output.resume)
    if directory.resume_state is not None:
        stderr.print(f"robench: resuming {directory.path}", highlight=False)
    progress = _Progress(stderr, task.total, enabled=not quiet and directory.main)
    with interrupt_on_sigterm():
        result = task.run(directory, Hooks(on_batch=progress.finished, on_warning=warn if directory.main else None))
    directory.finish(result)
    if directory.main:  # under torchrun only rank 0 reports
        _print(result.doc, as_json)
        if not quiet:
            stderr.print(f"results written to {directory.path}", highlight=False)


class _Progress:
    """Samples certified, on stderr: a line every half minute (a sample may take minutes at n = 100,000)."""

    def __init__(self, console: Console, total: int, enabled: bool) -> None:
        self.console, self.total, self.enabled = console, total, enabled
        self.done = 0
        self.started = self.last = time.monotonic()

    def finished(self, samples: int) -> None:
        self.done += samples
        now = time.monotonic()
        if self.enabled and now - self.last >= PLAIN_EVERY_SECONDS:
            self.last = now
            rate = self.done / (now - self.started)
            self.console.print(f"robench: certified {self.done:,} of {self.total:,} samples "
                               f"({rate:.2f} samples/s)", highlight=False)


def _print(doc: dict[str, Any], as_json: bool) -> None:
    """The results document (--json), or a table: accuracies, then the certified accuracy per radius."""
    from rich.table import Table

    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    s, certified, smoothed = doc["settings"], doc["certify"], doc["smoothed"]
    table = Table(title=f"{doc['model']['name']}: sigma {s['sigma']:g}, n0 {s['n0']:,}, n {s['n']:,}, "
                        f"alpha {s['alpha']:g}")
    table.add_column("")
    table.add_column("accuracy", justify="right")
    table.add_row("base model, clean", _percent(doc["clean"]["accuracy"]))
    table.add_row("smoothed, clean (PREDICT)", _percent(smoothed["accuracy"]))
    for row in doc["certified_accuracy"]:
        table.add_row(f"certified, L2 radius {row['radius']:g}", _percent(row["accuracy"]))
    console = stdout_console()
    console.print(table)
    median = certified["median_radius"]
    console.print(f"{doc['clean']['n']:,} samples; abstained: CERTIFY {certified['abstained']:,}, PREDICT "
                  f"{smoothed['abstained']:,}; median certified radius of the correct answers: "
                  f"{'-' if median is None else format(median, '.3f')}", highlight=False)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
