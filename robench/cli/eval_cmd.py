"""``robench eval MODEL --suite NAME``: the main job."""

from __future__ import annotations

from typing import Any

import typer

from robench.cli.common import handle_errors, stderr, warn
from robench.cli.eval_output import Gate, print_result, run_with_progress
from robench.cli.options import config_options
from robench.cli.options.data import Crop, Data, DataRoot, Download, Gray, Limit, MaxImagePixels, Resize, Split, \
    Workers
from robench.cli.options.engine import BatchSize, ChannelsLast, Compile, Device, Precision, Refill
from robench.cli.options.gate import AllowFlag, Baseline, Junit, MaxDrop, Metric, RequireSignificant, Rule
from robench.cli.options.model import Arch, Dataset, Mean, Model, ModelDir, Normalize, NumClasses, Std, \
    ThreatModel, TrustCheckpoint, Weights
from robench.cli.options.output import Json, Out, Quiet, Resume, SaveAdversarial, SaveEvery
from robench.cli.options.reid import Ap, Denominator, Distance, FeatureLayer, Flip, ImageSize, L2, Perturb, Ranks, \
    ReidPattern, Rerank, Surrogate, SurrogateArch, SurrogateNumClasses
from robench.cli.options.suite import Bpda, Eps, Norm, Plugin, Seed, Suite, SweepReuse, TrustSuite
from robench.cli.options.tracking import Track, TrackExperiment
from robench.cli.track import Tracking

# The modules that need torch are imported when the command runs, not when the command line
# is built: `robench --help` and `robench eval --help` start in a fraction of a second.

# What only the command line reads: printing, the gate and the tracking (which read the finished run).
_CLI_ONLY = ("as_json", "quiet", "baseline", "max_drop", "rule", "require_significant", "junit", "metric",
             "allow_flag", "track", "track_experiment")


@handle_errors
def eval_command(
    model: Model,
    suite: Suite = "pgd-linf",
    eps: Eps = None,
    norm: Norm = None,
    bpda: Bpda = None,
    data: Data = None,
    arch: Arch = None,
    num_classes: NumClasses = None,
    weights: Weights = None,
    dataset: Dataset = None,
    threat_model: ThreatModel = None,
    model_dir: ModelDir = None,
    trust_checkpoint: TrustCheckpoint = False,
    trust_suite: TrustSuite = False,
    plugin: Plugin = None,
    normalize: Normalize = None,
    mean: Mean = None,
    std: Std = None,
    device: Device = "auto",
    batch_size: BatchSize = "256",
    precision: Precision = "fp32",
    compile: Compile = "auto",
    channels_last: ChannelsLast = False,
    sweep_reuse: SweepReuse = False,
    refill: Refill = True,
    seed: Seed = 0,
    limit: Limit = None,
    data_root: DataRoot = None,
    download: Download = False,
    split: Split = "test",
    resize: Resize = None,
    crop: Crop = None,
    gray: Gray = None,
    max_image_pixels: MaxImagePixels = None,
    workers: Workers = 0,
    out: Out = None,
    resume: Resume = None,
    save_every: SaveEvery = 2.0,
    save_adversarial: SaveAdversarial = None,
    as_json: Json = False,
    quiet: Quiet = False,
    feature_layer: FeatureLayer = None,
    flip: Flip = False,
    l2: L2 = False,
    distance: Distance = "euclidean",
    ranks: Ranks = "1,5,10",
    ap: Ap = "noninterp",
    denominator: Denominator = "valid",
    rerank: Rerank = False,
    perturb: Perturb = "query",
    surrogate: Surrogate = None,
    surrogate_arch: SurrogateArch = None,
    surrogate_num_classes: SurrogateNumClasses = None,
    image_size: ImageSize = None,
    reid_pattern: ReidPattern = None,
    baseline: Baseline = None,
    max_drop: MaxDrop = 0.0,
    rule: Rule = None,
    require_significant: RequireSignificant = False,
    junit: Junit = None,
    metric: Metric = None,
    allow_flag: AllowFlag = None,
    track: Track = None,
    track_experiment: TrackExperiment = None,
) -> None:
    """Evaluate MODEL under every attack of a suite: clean and robust accuracy."""
    options = _config_options(locals())  # first: before the body binds any other name
    from robench.config import EvalConfig, unnormalised_weights_note
    from robench.tasks.run import eval_task, open_run_directory

    tracking = Tracking.of(track, track_experiment)  # a bad --track, or MLflow missing, fails now
    gate = Gate(baseline, max_drop, rule, require_significant, junit, allow_flag, metric).checked(tracking.uri)
    config = EvalConfig.of(**options)
    task = eval_task(config)
    directory = open_run_directory(task, config.output.out, config.output.resume)
    note = unnormalised_weights_note(task.resolved)
    if note and directory.main:
        warn(note)
    result = run_with_progress(task, directory, quiet)
    directory.finish(result)
    if not directory.main:
        return  # under torchrun only rank 0 reports
    print_result(task, result, as_json, forced_channels=gray is not None)
    stderr.print(f"results written to {directory.path}", highlight=False)
    code = gate.verdict(directory.path)
    # A regressed run is logged too: the history shows when robustness dropped.
    tracking.log(directory.path, gate_code=code, baseline=baseline)
    if code:
        raise typer.Exit(code)


def _config_options(values: dict[str, Any]) -> dict[str, Any]:
    """The command's values under ``EvalConfig.of``'s flat names: all but the command line's own, and the
    repeatable --plugin as ``plugins``."""
    options = config_options(values, _CLI_ONLY)
    options["plugins"] = tuple(options.pop("plugin") or ())
    return options
