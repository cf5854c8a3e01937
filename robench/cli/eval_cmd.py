"""``robench eval MODEL --suite NAME``: the main job."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from robench import distributed
from robench.api import EvaluationInterrupted, evaluate
from robench.cli.common import check_range, handle_errors, interrupt_on_sigterm, stderr, stdout_console
from robench.cli.gate_cmd import run_gate
from robench.gate import check_allowed_flags, parse_rule
from robench.results.progress import PROGRESS_FILE, has_progress, load_progress, run_key, save_progress
from robench.results.reading import read_result
from robench.cli.reid_eval import run_reid_eval
from robench.data.images import check_pixel_limit
from robench.data.sources import DataOptions
from robench.errors import Interrupted, RunError, UsageError
from robench.models import load_model, resolve_normalization
from robench.reid.api import is_reid_spec
from robench.precision import PRECISIONS
from robench.speed import COMPILE_MODES
from robench.report import results_table
from robench.results import default_run_dir, prepare_run_dir
from robench.suites import load_suite


MAX_SAVE_EVERY = 7 * 24 * 3600.0  # seconds
MAX_WORKERS = 256
MAX_BATCH_SIZE = 1 << 20


@handle_errors
def eval_command(
    model: str = typer.Argument(..., help="Checkpoint file (TorchScript, .pt/.pth, .safetensors) or example:digits."),
    suite: str = typer.Option("pgd-linf", "--suite", "-s", help="Built-in suite name or YAML path."),
    data: Optional[str] = typer.Option(None, "--data", "-d", help="npz:PATH, imagefolder:PATH, example:digits, "
                                       "or mnist/fashion-mnist/cifar10/cifar100/svhn/stl10[:split]. "
                                       "Default: the suite's dataset."),
    arch: Optional[str] = typer.Option(None, help="Architecture for state dicts: torchvision:NAME or module:factory."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Passed to the architecture factory."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint",
                                          help="Allow unpickling full Python objects and TorchScript programs "
                                          "(runs code from the file)."),
    trust_suite: bool = typer.Option(False, "--trust-suite",
                                     help="Allow a suite to import Python code (module:factory architectures)."),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="Preset: imagenet, cifar10, cifar100, "
                                            "mnist, fashion-mnist, none."),
    mean: Optional[str] = typer.Option(None, help="Per-channel mean, e.g. '0.485,0.456,0.406'."),
    std: Optional[str] = typer.Option(None, help="Per-channel std."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    batch_size: str = typer.Option("256", "--batch-size", "-b", help="Images per batch, or auto (the largest "
                                   "that fits on the GPU; 256 on a CPU)."),
    precision: str = typer.Option("fp32", help="fp32, tf32, bf16 or fp16 (recorded in the results)."),
    compile: str = typer.Option("auto", "--compile", help="torch.compile the model: on, off, or auto (GPU runs "
                                "with enough work to pay for the compilation)."),
    channels_last: bool = typer.Option(False, "--channels-last", help="NHWC memory format for convolutions."),
    sweep_reuse: bool = typer.Option(False, "--sweep-reuse", help="Any-iterate eps sweeps: a sample fooled at a "
                                     "smaller eps is not attacked again at a larger one."),
    seed: int = typer.Option(0, help="Seed of the per-sample random streams (random starts)."),
    limit: Optional[int] = typer.Option(None, help="Evaluate a fixed subset of N samples."),
    data_root: Optional[str] = typer.Option(None, "--data-root", help="Where torchvision datasets live."),
    download: bool = typer.Option(False, "--download", help="Download torchvision datasets if missing."),
    split: str = typer.Option("test", help="Dataset split for torchvision datasets."),
    resize: Optional[int] = typer.Option(None, help="Resize image folders (shorter side) before cropping."),
    crop: Optional[int] = typer.Option(None, help="Centre-crop image folders to this size."),
    gray: Optional[bool] = typer.Option(None, "--gray/--rgb", help="Image folders: force one or three channels "
                                        "(default: those of most images; a tie gives three)."),
    max_image_pixels: Optional[int] = typer.Option(None, "--max-image-pixels", help="Image folders: skip images "
                                                   "with more pixels (decompression bombs; default: Pillow's limit)."),
    workers: int = typer.Option(0, help="DataLoader worker processes for file-based datasets."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<suite>/<model>/<UTC time>/); "
                                       "an interrupted run there is continued."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted run in this directory."),
    save_every: float = typer.Option(2.0, "--save-every", help="Seconds between progress saves (0: every batch)."),
    as_json: bool = typer.Option(False, "--json", help="Print only the results JSON to stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    # re-identification (market1501:, dukemtmc:, reid: datasets)
    feature_layer: Optional[str] = typer.Option(None, "--feature-layer", help="ReID: take features from this module."),
    flip: bool = typer.Option(False, "--flip", help="ReID: add the features of the flipped image."),
    l2: bool = typer.Option(False, "--l2", help="ReID: L2-normalise features."),
    distance: str = typer.Option("euclidean", help="ReID: euclidean or cosine."),
    ranks: str = typer.Option("1,5,10", help="ReID: CMC ranks."),
    ap: str = typer.Option("noninterp", help="ReID: AP convention, noninterp (torchreid) or trapezoid "
                           "(Market-1501 MATLAB code)."),
    denominator: str = typer.Option("valid", help="ReID: queries without a valid match are skipped (valid) "
                                    "or count as 0 (all)."),
    rerank: bool = typer.Option(False, "--rerank", help="ReID: also report k-reciprocal re-ranking."),
    perturb: str = typer.Option("query", help="ReID: which split attacks perturb, query or gallery."),
    surrogate: Optional[str] = typer.Option(None, "--surrogate", help="ReID: model for transfer attacks."),
    surrogate_arch: Optional[str] = typer.Option(None, "--surrogate-arch"),
    surrogate_num_classes: Optional[int] = typer.Option(None, "--surrogate-num-classes"),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="ReID: resize images to HxW, e.g. 256x128."),
    reid_pattern: Optional[str] = typer.Option(None, "--reid-pattern",
                                               help="ReID: filename regex with groups (person id, camera)."),
    # gate the run in the same step
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Gate the results against this run "
                                            "(exit 1 on a regression)."),
    max_drop: float = typer.Option(0.0, "--max-drop", help="With --baseline: allowed drop (0.01 = 1 point)."),
    rule: Optional[List[str]] = typer.Option(None, "--rule", help="With --baseline: METRIC@ENTRY:THRESHOLD."),
    require_significant: bool = typer.Option(False, "--require-significant"),
    junit: Optional[Path] = typer.Option(None, "--junit", help="With --baseline: JUnit XML report."),
    allow_flag: Optional[List[str]] = typer.Option(None, "--allow-flag", help="With --baseline: a sanity flag "
                                                   "that may pass the gate (e.g. gradient_masking), or 'all'."),
) -> None:
    """Evaluate MODEL under every attack of a suite: clean and robust accuracy."""
    if baseline is None and (rule or junit or require_significant or max_drop or allow_flag):
        raise UsageError("--max-drop, --rule, --require-significant, --junit and --allow-flag need --baseline")
    if baseline is not None:
        read_result(baseline)  # fail before the run, not after it
        for text in rule or []:
            parse_rule(text)
        check_allowed_flags(allow_flag or [])
    batch_size = _batch_size(batch_size)
    check_range("--save-every", save_every, 0, MAX_SAVE_EVERY)
    check_range("--workers", workers, 0, MAX_WORKERS)
    check_pixel_limit(max_image_pixels)
    if compile not in COMPILE_MODES:
        raise UsageError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {compile!r}")
    if precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    loaded_suite = load_suite(suite, trust_code=trust_suite)
    # An explicit --normalize/--mean/--std wins over the suite's suggestion.
    preset = normalize if normalize else (None if (mean or std) else loaded_suite.suite.normalize)
    normalization = resolve_normalization(preset, mean, std)
    loaded = load_model(model, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint)
    data_spec = data or loaded_suite.suite.dataset
    if data_spec is None and model.startswith("example:"):
        data_spec = model
    if data_spec is None:
        raise UsageError(f"suite {loaded_suite.suite.name} names no dataset: pass --data")
    if resume is not None and out is not None and resume != out:
        raise UsageError("give either --resume DIR or --out DIR")
    if resume is not None and not has_progress(resume):
        raise UsageError(f"{resume} holds no interrupted run to resume")
    rank, processes, _ = distributed.world()
    main = rank == 0
    if processes > 1 and (resume is not None or (out is not None and has_progress(out))):
        raise UsageError("--resume is not available under torchrun; resume with a single process")
    # Under torchrun every process evaluates its shard; only rank 0 writes anything.
    run_dir = prepare_run_dir(resume or out or default_run_dir(loaded_suite.suite.name, loaded.name)) if main \
        else Path(".")
    if is_reid_spec(data_spec) or loaded_suite.suite.task == "reid":
        run_reid_eval(
            loaded, data_spec, loaded_suite, run_dir, normalization=normalization, trust_checkpoint=trust_checkpoint,
            feature_layer=feature_layer, flip=flip, l2=l2, distance=distance, ranks=ranks, ap=ap,
            denominator=denominator, rerank=rerank, perturb=perturb, surrogate=surrogate,
            surrogate_arch=surrogate_arch, surrogate_num_classes=surrogate_num_classes, image_size=image_size,
            reid_pattern=reid_pattern, device=device, batch_size=batch_size, seed=seed, workers=workers,
            as_json=as_json, quiet=quiet,
        )
        if main:
            _gate(run_dir, baseline, max_drop, rule, require_significant, junit, allow_flag)
        return
    options = DataOptions(root=data_root, download=download, limit=limit, resize=resize, crop=crop, split=split,
                          gray=gray, max_image_pixels=max_image_pixels)

    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=stderr, transient=True,
                        disable=quiet or not sys.stderr.isatty() or not main)
    key = run_key({"model": loaded.sha256 or loaded.source, "arch": loaded.arch, "suite": loaded_suite.sha256,
                        "data": data_spec, "options": options.__dict__, "normalization": normalization,
                        "device": device, "batch_size": batch_size, "precision": precision, "seed": seed,
                        "compile": compile, "channels_last": channels_last, "sweep_reuse": sweep_reuse})
    single = main and processes == 1
    resume_state = load_progress(run_dir, key) if single and has_progress(run_dir) else None
    if resume_state is not None:
        stderr.print(f"robench: resuming {run_dir} after {resume_state['batches']} finished batch(es)",
                     highlight=False)
    # SIGTERM is turned into an interruption only while evaluating: the final progress file is on
    # disk before the results are written, so a kill at any later moment still resumes to the end.
    with progress, interrupt_on_sigterm():
        task = progress.add_task(f"{loaded.name} · {loaded_suite.suite.name}", total=None)
        try:
            result = evaluate(
                loaded, data_spec, loaded_suite, normalization=normalization, device=device,
                batch_size=batch_size, precision=precision, seed=seed, workers=workers,
                data_options=options, on_batch=lambda k: progress.advance(task, k),
                resume_state=resume_state, save_every=save_every, compile=compile, channels_last=channels_last,
                sweep_reuse=sweep_reuse,
                save_state=progress_saver(run_dir, key) if single else None,
            )
        except EvaluationInterrupted as stopped:
            if not main:
                raise Interrupted("interrupted") from None
            stopped.result.save(run_dir)
            done = stopped.result.doc["progress"]
            raise Interrupted(
                f"interrupted after {done['evaluated']} of {done['total']} samples; partial results in "
                f"{run_dir}/results.json (complete: false); run the same command with --resume {run_dir}") from None
    if not main:
        return
    result.save(run_dir)
    (run_dir / PROGRESS_FILE).unlink(missing_ok=True)
    if result.doc["data"].get("skipped"):
        stderr.print(f"robench: warning: skipped {len(result.doc['data']['skipped'])} unreadable file(s) "
                     "(listed in results.json under data.skipped)", highlight=False)
    if result.doc["data"].get("converted") and gray is None:  # forced conversions were asked for: no warning
        stderr.print(f"robench: warning: converted {len(result.doc['data']['converted'])} image(s) to the channels "
                     "of most images (listed in results.json under data.converted)", highlight=False)
    for flag in result.doc["sanity"]["flags"]:
        stderr.print(f"robench: warning: {flag}", highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(result.doc, indent=2) + "\n")
    else:
        stdout_console().print(results_table(result.doc))
    stderr.print(f"results written to {run_dir}", highlight=False)
    _gate(run_dir, baseline, max_drop, rule, require_significant, junit, allow_flag)


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    # isdigit alone accepts "²" and other digits int() refuses.
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_BATCH_SIZE:
        raise UsageError(f"--batch-size must be an integer from 1 to {MAX_BATCH_SIZE} or auto, got {text!r}")
    return int(text)


def progress_saver(run_dir: Path, key: str):
    """Snapshots go to disk as the run goes; a full disk is a warning there, not the end of the run.

    The last good progress file stays in place (writes are atomic), and the
    results are still in memory: if space is freed, the final write succeeds.
    """
    warned = False

    def save(state: dict) -> None:
        nonlocal warned
        try:
            save_progress(run_dir, state, key)
        except RunError as exc:
            if not warned:
                stderr.print(f"robench: warning: {exc}", highlight=False)
                warned = True

    return save


def _gate(run_dir: Path, baseline: Optional[Path], max_drop: float, rules: Optional[List[str]],
          require_significant: bool, junit: Optional[Path], allow_flags: Optional[List[str]] = None) -> None:
    """The results are written first: a failing gate never loses the run."""
    if baseline is None:
        return
    code = run_gate(run_dir, baseline, max_drop, rules or [], require_significant, junit, as_json=False, quiet=True,
                    allow_flags=allow_flags)
    if code:
        raise typer.Exit(code)
