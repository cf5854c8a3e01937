"""``robench eval MODEL --suite NAME``: the main job."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional

import typer

from robench.cli.common import handle_errors, interrupt_on_sigterm, stderr, stdout_console, warn
from robench.errors import UsageError

if TYPE_CHECKING:
    from robench.results.result import Result
    from robench.tasks.classification import ClassificationTask
    from robench.tasks.reid import ReIDTask
    from robench.tasks.rundir import RunDirectory

# The modules that need torch are imported when the command runs, not when the command line
# is built: `robench --help` and `robench eval --help` start in a fraction of a second.


# Help panels: the options of `robench eval --help`, grouped as a user looks for them.
_MODEL = "Model"
_SUITE = "Suite and attacks"
_DATA = "Data"
_SPEED = "Speed and precision"
_OUTPUT = "Output and resume"
_REID = "Re-identification"
_GATE = "CI gate (with --baseline)"


@handle_errors
def eval_command(
    model: str = typer.Argument(..., help="Checkpoint file (TorchScript, .pt/.pth, .safetensors), example:digits, "
                                "or a model by name with its preprocessing: timm:NAME, "
                                "torchvision:NAME:WEIGHTS (e.g. torchvision:resnet50:IMAGENET1K_V2), hf:ORG/NAME "
                                "(a timm model on the Hugging Face hub), robustbench:NAME."),
    suite: str = typer.Option("pgd-linf", "--suite", "-s", help="Built-in suite name or YAML path.",
                              rich_help_panel=_SUITE),
    eps: Optional[str] = typer.Option(None, "--eps", help="Run every suite entry that has an eps at this one "
                                      "instead: a value as in suites (8/255, 0.03) or a comma-separated sweep "
                                      "(2/255,4/255,8/255). Recorded in the results.", rich_help_panel=_SUITE),
    norm: Optional[str] = typer.Option(None, "--norm", help="Run those entries under this norm instead: linf or "
                                       "l2. Recorded in the results.", rich_help_panel=_SUITE),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="npz:PATH, imagefolder:PATH, example:digits, "
                                       "or a dataset name (mnist, fashion-mnist, cifar10, cifar100, svhn, "
                                       "stl10) with an optional :split. "
                                       "Default: the suite's dataset.", rich_help_panel=_DATA),
    arch: Optional[str] = typer.Option(None, help="Architecture for state dicts: torchvision:NAME or module:factory.",
                                       rich_help_panel=_MODEL),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Passed to the architecture factory.",
                                              rich_help_panel=_MODEL),
    weights: Optional[str] = typer.Option(None, "--weights", help="timm:NAME / torchvision:NAME: load this local "
                                          "weights file (state dict or .safetensors) instead of downloading; "
                                          "classes from the file or --num-classes.", rich_help_panel=_MODEL),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="robustbench: models: the dataset they were "
                                          "trained on, cifar10 (default), cifar100 or imagenet.",
                                          rich_help_panel=_MODEL),
    threat_model: Optional[str] = typer.Option(None, "--threat-model", help="robustbench: models: Linf (default), "
                                               "L2 or corruptions.", rich_help_panel=_MODEL),
    model_dir: Optional[str] = typer.Option(None, "--model-dir", help="robustbench: models: where their "
                                            "checkpoints are kept (default: models).", rich_help_panel=_MODEL),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint",
                                          help="Allow unpickling full Python objects and TorchScript programs "
                                          "(runs code from the file).", rich_help_panel=_MODEL),
    trust_suite: bool = typer.Option(False, "--trust-suite",
                                     help="Allow a suite to import Python code (module:factory architectures, "
                                     "plugins:).", rich_help_panel=_SUITE),
    plugin: Optional[List[str]] = typer.Option(None, "--plugin", help="Import MODULE first: it registers attacks "
                                               "(robench.register_attack). Repeatable.", rich_help_panel=_SUITE),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="Preset: imagenet, cifar10, cifar100, "
                                            "mnist, fashion-mnist, none. Models by name bring their own "
                                            "mean/std; this (or --mean/--std) replaces it.", rich_help_panel=_MODEL),
    mean: Optional[str] = typer.Option(None, help="Per-channel mean, e.g. '0.485,0.456,0.406'.",
                                       rich_help_panel=_MODEL),
    std: Optional[str] = typer.Option(None, help="Per-channel std.", rich_help_panel=_MODEL),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N.", rich_help_panel=_SPEED),
    batch_size: str = typer.Option("256", "--batch-size", "-b", help="Images per batch, or auto (the largest "
                                   "that fits on the GPU; 256 on a CPU).", rich_help_panel=_SPEED),
    precision: str = typer.Option("fp32", help="fp32, tf32, bf16 or fp16 (recorded in the results).",
                                  rich_help_panel=_SPEED),
    compile: str = typer.Option("auto", "--compile", help="torch.compile the model: on, off, or auto (GPU runs "
                                "with enough work to pay for the compilation).", rich_help_panel=_SPEED),
    channels_last: bool = typer.Option(False, "--channels-last", help="NHWC memory format for convolutions.",
                                       rich_help_panel=_SPEED),
    sweep_reuse: bool = typer.Option(False, "--sweep-reuse", help="Any-iterate eps sweeps: a sample fooled at a "
                                     "smaller eps is not attacked again at a larger one.", rich_help_panel=_SUITE),
    refill: bool = typer.Option(True, "--refill/--no-refill", help="Continuous batching: slots of fooled or "
                                "finished samples go to the next ones (the same results, faster).",
                                rich_help_panel=_SPEED),
    seed: int = typer.Option(0, help="Seed of the per-sample random streams (random starts).", rich_help_panel=_SUITE),
    limit: Optional[int] = typer.Option(None, help="Evaluate a fixed subset of N samples.", rich_help_panel=_DATA),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where torchvision datasets live.",
                                            rich_help_panel=_DATA),
    download: bool = typer.Option(False, "--download", help="Download torchvision datasets if missing.",
                                  rich_help_panel=_DATA),
    split: str = typer.Option("test", help="Dataset split for torchvision datasets.", rich_help_panel=_DATA),
    resize: Optional[int] = typer.Option(None, help="Resize image folders (shorter side) before cropping "
                                         "(default: a model by name's own resize).", rich_help_panel=_DATA),
    crop: Optional[int] = typer.Option(None, help="Centre-crop image folders to this size (default: a model by "
                                       "name's own crop).", rich_help_panel=_DATA),
    gray: Optional[bool] = typer.Option(None, "--gray/--rgb", help="Image folders: force one or three channels "
                                        "(default: those of most images; a tie gives three).", rich_help_panel=_DATA),
    max_image_pixels: Optional[int] = typer.Option(None, "--max-image-pixels", help="Image folders: skip images "
                                                   "with more pixels (decompression bombs; default: Pillow's limit).",
                                                   rich_help_panel=_DATA),
    workers: int = typer.Option(0, help="DataLoader worker processes for file-based datasets.",
                                rich_help_panel=_DATA),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Run directory (default runs/<suite>/<model>/<UTC time>/); "
                                       "an interrupted run there is continued.", rich_help_panel=_OUTPUT),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted run in this directory.",
                                          rich_help_panel=_OUTPUT),
    save_every: float = typer.Option(2.0, "--save-every", help="Seconds between progress saves (0: every batch).",
                                     rich_help_panel=_OUTPUT),
    save_adversarial: Optional[str] = typer.Option(None, "--save-adversarial", metavar="[N|all]",
                                                   help="Save the first N samples' adversarial examples (alone or all: "
                                                   "every sample) as 8-bit images in adversarial/<entry>.npz, "
                                                   "with a PNG grid per entry.", rich_help_panel=_OUTPUT),
    as_json: bool = typer.Option(False, "--json", help="Print only the results JSON to stdout.",
                                 rich_help_panel=_OUTPUT),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar.", rich_help_panel=_OUTPUT),
    # re-identification (market1501:, dukemtmc:, reid: datasets)
    feature_layer: Optional[str] = typer.Option(None, "--feature-layer", help="ReID: take features from this module.",
                                                rich_help_panel=_REID),
    flip: bool = typer.Option(False, "--flip", help="ReID: add the features of the flipped image.",
                              rich_help_panel=_REID),
    l2: bool = typer.Option(False, "--l2", help="ReID: L2-normalise features.", rich_help_panel=_REID),
    distance: str = typer.Option("euclidean", help="ReID: euclidean or cosine.", rich_help_panel=_REID),
    ranks: str = typer.Option("1,5,10", help="ReID: CMC ranks.", rich_help_panel=_REID),
    ap: str = typer.Option("noninterp", help="ReID: AP convention, noninterp (torchreid) or trapezoid "
                           "(Market-1501 MATLAB code).", rich_help_panel=_REID),
    denominator: str = typer.Option("valid", help="ReID: queries without a valid match are skipped (valid) "
                                    "or count as 0 (all).", rich_help_panel=_REID),
    rerank: bool = typer.Option(False, "--rerank", help="ReID: also report k-reciprocal re-ranking.",
                                rich_help_panel=_REID),
    perturb: str = typer.Option("query", help="ReID: which split attacks perturb, query or gallery.",
                                rich_help_panel=_REID),
    surrogate: Optional[str] = typer.Option(None, "--surrogate", help="ReID: model for transfer attacks.",
                                            rich_help_panel=_REID),
    surrogate_arch: Optional[str] = typer.Option(None, "--surrogate-arch", help="ReID: architecture of a "
                                                 "state-dict surrogate (as --arch).", rich_help_panel=_REID),
    surrogate_num_classes: Optional[int] = typer.Option(None, "--surrogate-num-classes",
                                                        help="ReID: passed to the surrogate's architecture factory.",
                                                        rich_help_panel=_REID),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="ReID: resize images to HxW, e.g. 256x128.",
                                             rich_help_panel=_REID),
    reid_pattern: Optional[str] = typer.Option(None, "--reid-pattern",
                                               help="ReID: filename regex with groups (person id, camera).",
                                               rich_help_panel=_REID),
    # gate the run in the same step
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Gate the results against this run "
                                            "(exit 1 on a regression).", rich_help_panel=_GATE),
    max_drop: float = typer.Option(0.0, "--max-drop", help="With --baseline: allowed drop (0.01 = 1 point).",
                                   rich_help_panel=_GATE),
    rule: Optional[List[str]] = typer.Option(None, "--rule", help="With --baseline: METRIC@ENTRY:THRESHOLD.",
                                             rich_help_panel=_GATE),
    require_significant: bool = typer.Option(False, "--require-significant", help="With --baseline: fail only "
                                             "on drops beyond 1.96 standard errors.", rich_help_panel=_GATE),
    junit: Optional[Path] = typer.Option(None, "--junit", help="With --baseline: JUnit XML report.",
                                         rich_help_panel=_GATE),
    metric: Optional[List[str]] = typer.Option(None, "--metric", help="With --baseline: metrics to gate (default: "
                                               "the accuracy metrics; e.g. accuracy,robust_accuracy,success_rate).",
                                               rich_help_panel=_GATE),
    allow_flag: Optional[List[str]] = typer.Option(None, "--allow-flag", help="With --baseline: a sanity flag "
                                                   "that may pass the gate (e.g. gradient_masking), or 'all'.",
                                                   rich_help_panel=_GATE),
) -> None:
    """Evaluate MODEL under every attack of a suite: clean and robust accuracy."""
    from robench.config import EvalConfig, unnormalised_weights_note
    from robench.reid.report import reid_table
    from robench.reporting.gate import check_allowed_flags, check_metrics, parse_metrics, parse_rule, \
        reported_metrics
    from robench.reporting.tables import results_table
    from robench.results.reading import read_result
    from robench.tasks.run import eval_task, open_run_directory

    if baseline is None and (rule or junit or require_significant or max_drop or allow_flag or metric):
        raise UsageError("--max-drop, --rule, --metric, --require-significant, --junit and --allow-flag need "
                         "--baseline")
    if baseline is not None:
        base = read_result(baseline)  # fail before the run, not after it
        check_metrics(parse_metrics(metric), reported_metrics(base))
        for text in rule or []:
            parse_rule(text)
        check_allowed_flags(allow_flag or [])
    config = EvalConfig(
        batch_size=batch_size, save_every=save_every, workers=workers, max_image_pixels=max_image_pixels,
        compile=compile, precision=precision, distance=distance, ranks=ranks, ap=ap, denominator=denominator,
        perturb=perturb, image_size=image_size, model=model, arch=arch, num_classes=num_classes,
        weights=weights, dataset=dataset, threat_model=threat_model, model_dir=model_dir,
        trust_checkpoint=trust_checkpoint, trust_suite=trust_suite, suite=suite, eps=eps, norm=norm,
        data=data, normalize=normalize,
        mean=mean, std=std, device=device, channels_last=channels_last, sweep_reuse=sweep_reuse, refill=refill,
        seed=seed, plugins=tuple(plugin or ()), save_adversarial=save_adversarial,
        limit=limit, data_root=data_root, download=download, split=split, resize=resize, crop=crop, gray=gray,
        out=out, resume=resume, feature_layer=feature_layer, flip=flip, l2=l2, rerank=rerank,
        reid_pattern=reid_pattern, surrogate=surrogate, surrogate_arch=surrogate_arch,
        surrogate_num_classes=surrogate_num_classes,
    )
    task = eval_task(config)
    directory = open_run_directory(task, config.out, config.resume)
    note = unnormalised_weights_note(task.resolved)
    if note and directory.main:
        warn(note)
    result = _run_with_progress(task, directory, quiet)
    directory.finish(result)
    if not directory.main:
        return  # under torchrun only rank 0 reports
    if task.name == "reid":
        _print(result.doc, reid_table(result.doc), as_json)
    else:
        _warn_about(result.doc, forced_channels=gray is not None)
        for line in result.rounding_warnings():  # the saved 8-bit images do not reproduce the reported number
            warn(line)
        _print(result.doc, results_table(result.doc), as_json)
    stderr.print(f"results written to {directory.path}", highlight=False)
    _gate(directory.path, baseline, max_drop, rule, require_significant, junit, allow_flag, metric)


def _run_with_progress(task: ClassificationTask | ReIDTask, directory: RunDirectory, quiet: bool) -> Result:
    """The run, its progress on stderr (a bar, or a line per ReID stage); Ctrl-C and SIGTERM stop it with the
    finished work saved."""
    from robench.cli.progress_view import EvalProgress
    from robench.evaluation.entries import entry_weights
    from robench.tasks import Hooks

    if task.name == "classification":
        suite = task.resolved.suite.suite
        progress = EvalProgress(stderr, f"{task.resolved.loaded.name} · {suite.name}", entry_weights(suite),
                                enabled=not quiet and directory.main)
        hooks = Hooks(progress=progress, on_warning=warn)
    else:  # ReID: a line per stage, unless quiet
        progress = contextlib.nullcontext()
        hooks = Hooks() if quiet else Hooks(on_warning=warn, on_step=_note)
    if directory.resume_state is not None:
        stderr.print(f"robench: resuming {directory.path} after {_finished_text(task, directory.resume_state)}",
                     highlight=False)
    # SIGTERM is turned into an interruption only while evaluating: the final progress file is on
    # disk before the results are written, so a kill at any later moment still resumes to the end.
    with progress, interrupt_on_sigterm():
        return task.run(directory, hooks)


def _finished_text(task: ClassificationTask | ReIDTask, state: dict) -> str:
    if task.name == "reid":
        return f"{len(state.get('settings', ()))} finished setting(s)"
    text = f"{state['batches']} finished batch(es)"
    partial = state.get("partial")
    if partial:  # what the attacks finished of the segment under way
        pairs = sum(int(entry["done"].sum()) for entry in partial["entries"])
        text += f", keeping {pairs} finished (sample, attack) pair(s) of the next segment"
    return text


def _warn_about(doc: dict, forced_channels: bool) -> None:
    if doc["data"].get("skipped"):
        warn(f"skipped {len(doc['data']['skipped'])} unreadable file(s) (listed in results.json under "
              "data.skipped)")
    if doc["data"].get("converted") and not forced_channels:  # forced conversions were asked for: no warning
        warn(f"converted {len(doc['data']['converted'])} image(s) to the channels of most images (listed in "
              "results.json under data.converted)")
    for flag in doc["sanity"]["flags"]:
        warn(flag)


def _print(doc: dict, table: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        stdout_console().print(table)


def _note(message: str) -> None:
    stderr.print(f"robench: {message}", highlight=False)


def _gate(run_dir: Path, baseline: Optional[Path], max_drop: float, rules: Optional[List[str]],
          require_significant: bool, junit: Optional[Path], allow_flags: Optional[List[str]] = None,
          metrics: Optional[List[str]] = None) -> None:
    """The results are written first: a failing gate never loses the run."""
    from robench.cli.gate_cmd import run_gate

    if baseline is None:
        return
    code = run_gate(run_dir, baseline, max_drop, rules or [], require_significant, junit, as_json=False, quiet=True,
                    allow_flags=allow_flags, metrics=metrics)
    if code:
        raise typer.Exit(code)
