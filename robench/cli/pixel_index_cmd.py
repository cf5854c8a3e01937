"""``robench pixel-index MODEL FOLDER``: random few-pixel changes and the Pixel-index."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from robench.cli.common import handle_errors, interrupt_on_sigterm, stderr, stdout_console, warn
from robench.cli.options import config_options
from robench.cli.options.data import ClassMap, Folder, InputSize, PixelCrop, PixelGray, PixelMaxImagePixels, \
    PixelResize
from robench.cli.options.engine import PixelBatchSize, PixelDevice
from robench.cli.options.model import PixelArch, PixelDataset, PixelMean, PixelModel, PixelModelDir, \
    PixelNormalize, PixelNumClasses, PixelStd, PixelThreatModel, PixelTrustCheckpoint, PixelWeights
from robench.cli.options.output import PixelJson, PixelOut, PixelQuiet, PixelResume, PixelSaveAdversarial, \
    PixelSaveEvery
from robench.cli.options.pixels import Area, Channels, Delta, OnAttack, PixelEps, PixelSeed, Pixels, \
    SharedPositions, Trials
from robench.cli.options.tracking import PixelTrack, PixelTrackExperiment
from robench.cli.track import Tracking


@handle_errors
def pixel_index_command(
    model: PixelModel,
    folder: Folder,
    pixels: Pixels = "4,8,16,32,64",
    delta: Delta = None,
    area: Area = None,
    trials: Trials = 1,
    seed: PixelSeed = 0,
    shared_positions: SharedPositions = False,
    channels: Channels = "all",
    on_attack: OnAttack = None,
    eps: PixelEps = None,
    arch: PixelArch = None,
    num_classes: PixelNumClasses = None,
    weights: PixelWeights = None,
    dataset: PixelDataset = None,
    threat_model: PixelThreatModel = None,
    model_dir: PixelModelDir = None,
    trust_checkpoint: PixelTrustCheckpoint = False,
    normalize: PixelNormalize = None,
    mean: PixelMean = None,
    std: PixelStd = None,
    input_size: InputSize = None,
    resize: PixelResize = None,
    crop: PixelCrop = None,
    class_map: ClassMap = None,
    gray: PixelGray = None,
    max_image_pixels: PixelMaxImagePixels = None,
    device: PixelDevice = "auto",
    batch_size: PixelBatchSize = 256,
    out: PixelOut = None,
    resume: PixelResume = None,
    save_every: PixelSaveEvery = 2.0,
    save_adversarial: PixelSaveAdversarial = None,
    as_json: PixelJson = False,
    quiet: PixelQuiet = False,
    track: PixelTrack = None,
    track_experiment: PixelTrackExperiment = None,
) -> None:
    """Misclassification under random few-pixel changes, and the Pixel-index Pi = w / (p r a)."""
    # First: before the body binds any other name. Printing and tracking are the command line's own.
    options = config_options(locals(), ("as_json", "quiet", "track", "track_experiment"))
    tracking = Tracking.of(track, track_experiment)  # a bad --track, or MLflow missing, fails before the run
    # Imported here, not at the top: building the command line (--help) must not load torch.
    from robench.tasks import Hooks
    from robench.tasks.pixel_index import PixelIndexConfig, PixelIndexTask
    from robench.tasks.rundir import RunDirectory

    config = PixelIndexConfig.of(**options)
    task = PixelIndexTask(config)
    directory = RunDirectory.open(task.resume_settings(), task.default_dir, out=config.output.out,
                                  resume=config.output.resume, queued=True)
    if directory.resume_state is not None:
        stderr.print(f"robench: resuming {directory.path} after {_finished_text(directory.resume_state)}",
                     highlight=False)
    # SIGTERM stops the run like Ctrl-C only while it computes: the last progress file is on disk
    # before the results are written, so a kill at any later moment still resumes to the end.
    with interrupt_on_sigterm():
        result = task.run(directory, Hooks(on_warning=warn if directory.main else None))
    directory.finish(result)
    if directory.main:  # under torchrun only rank 0 reports
        _print(result.doc, as_json, None if quiet else directory.path)
        tracking.log(directory.path, announce=not quiet)


def _finished_text(state: dict[str, Any]) -> str:
    from robench.evaluation.work_queue import finished_units_text, is_queue_progress

    if is_queue_progress(state):  # a torchrun job's: units of the plan, finished in any order
        return finished_units_text(state)
    return f"{state['clean_total']} finished image(s)"


def _print(doc: dict[str, Any], as_json: bool, written: Path | None) -> None:
    """The results (JSON or tables) on stdout, then where they were written (``written``) on stderr."""
    from robench.pixels.report import pixel_tables

    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        console = stdout_console()
        images = doc["images"]
        console.print(f"{images['evaluated']} of {images['read']} images evaluated: "
                      f"{images['excluded_misclassified']} excluded (misclassified before any change), "
                      f"{len(images['skipped'])} file(s) skipped", highlight=False)
        for table in pixel_tables(doc):
            console.print(table)
    if written is not None:
        stderr.print(f"results written to {written}", highlight=False)
