"""``robench pixel-index MODEL FOLDER``: random few-pixel changes and the Pixel-index."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from robench.cli.common import handle_errors, stderr, stdout_console, warn
from robench.errors import UsageError


def _ints(text: str | None, what: str) -> list[int]:
    if not text:
        return []
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise UsageError(f"--{what} takes comma-separated integers, got {text!r}") from None
    if any(v < 0 for v in values) or not values:
        raise UsageError(f"--{what} values must be non-negative integers, got {text!r}")
    return values


def _areas(text: str | None) -> list[tuple[int, int]]:
    areas = []
    for part in (text or "").replace(" ", "").split(","):
        if not part:
            continue
        rows, _, cols = part.lower().partition("x")
        if not rows.isdigit() or (cols and not cols.isdigit()) or int(rows) < 1 or (cols and int(cols) < 1):
            raise UsageError(f"--area takes sides such as 200 or 200x150, got {part!r}")
        areas.append((int(rows), int(cols or rows)))
    return areas


@handle_errors
def pixel_index_command(
    model: str = typer.Argument(..., help="Checkpoint file, example:digits, or a model by name with its "
                                "preprocessing: timm:NAME, torchvision:NAME:WEIGHTS, hf:ORG/NAME, robustbench:NAME."),
    # readable=False: robench checks access itself and names the OS reason in one line
    folder: Path = typer.Argument(..., readable=False, help="Images: class sub-folders (labels) or a flat folder."),
    pixels: str = typer.Option("4,8,16,32,64", help="Pixel counts to change, comma-separated."),
    delta: Optional[str] = typer.Option(None, help="Experiment 2: offsets within ±delta, e.g. 10,40,70,100,127."),
    area: Optional[str] = typer.Option(None, help="Experiment 3: centred areas, e.g. 200,150 or 200x150."),
    trials: int = typer.Option(1, help="Independent draws per setting; mean and spread are reported."),
    seed: int = typer.Option(0, help="Seed of the per-image random streams."),
    shared_positions: bool = typer.Option(False, "--shared-positions",
                                          help="One position list for all images (the paper's Algorithm 1)."),
    channels: str = typer.Option("all", help="Channels of a chosen pixel that change: all or first."),
    on_attack: Optional[str] = typer.Option(None, "--on-attack", help="Experiment 4: fgsm."),
    eps: Optional[str] = typer.Option(None, help="Eps of --on-attack, in [0,1] pixel units (e.g. 8/255)."),
    arch: Optional[str] = typer.Option(None, help="Architecture for state dicts: torchvision:NAME or module:factory."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Passed to the architecture factory."),
    weights: Optional[str] = typer.Option(None, "--weights", help="timm:NAME / torchvision:NAME: a local weights "
                                          "file instead of a download."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="robustbench: cifar10, cifar100 or imagenet."),
    threat_model: Optional[str] = typer.Option(None, "--threat-model", help="robustbench: Linf, L2 or corruptions."),
    model_dir: Optional[str] = typer.Option(None, "--model-dir", help="robustbench: checkpoint folder "
                                            "(default: models)."),
    trust_checkpoint: bool = typer.Option(False, "--trust-checkpoint",
                                          help="Allow unpickling full Python objects and TorchScript programs "
                                          "(runs code from the file)."),
    normalize: Optional[str] = typer.Option(None, "--normalize", "--preset", help="imagenet, cifar10, ... "
                                            "(replaces the mean/std a model by name brings)."),
    mean: Optional[str] = typer.Option(None, help="Per-channel mean, e.g. '0.485,0.456,0.406'."),
    std: Optional[str] = typer.Option(None, help="Per-channel std."),
    input_size: Optional[int] = typer.Option(None, "--input-size",
                                             help="Resize the shorter side to N/0.875 and centre-crop N."),
    resize: Optional[int] = typer.Option(None, help="Resize the shorter side to this size."),
    crop: Optional[int] = typer.Option(None, help="Centre-crop to this size."),
    class_map: Optional[str] = typer.Option(None, "--class-map", help="Folder name -> class index (JSON or text)."),
    gray: Optional[bool] = typer.Option(None, "--gray/--rgb", help="Force one or three channels "
                                        "(default: those of most images; a tie gives three)."),
    max_image_pixels: Optional[int] = typer.Option(None, "--max-image-pixels", help="Skip images with more "
                                                   "pixels (decompression bombs; default: Pillow's limit)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    batch_size: int = typer.Option(256, "--batch-size", "-b", help="Images per forward pass."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/pixel-index/<model>/<UTC time>/)."),
    save_adversarial: Optional[str] = typer.Option(None, "--save-adversarial", metavar="[N|all]",
                                                   help="Save the first N images (alone or all: every image) as changed "
                                                   "by the first trial, per setting and pixel count, in "
                                                   "adversarial/<setting>.npz with a PNG grid."),
    as_json: bool = typer.Option(False, "--json", help="Print only the results JSON to stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print where the results were written."),
) -> None:
    """Misclassification under random few-pixel changes, and the Pixel-index Pi = w / (p r a)."""
    # Imported here, not at the top: building the command line (--help) must not load torch.
    from robench.config import check_range
    from robench.data.images import check_pixel_limit, input_geometry
    from robench.expressions import eval_expr
    from robench.models import load_model, resolve_normalization
    from robench.pixels.experiment import build_settings
    from robench.pixels.folder import pixel_index_folder
    from robench.pixels.perturb import CHANNEL_MODES, MAX_TRIALS
    from robench.pixels.report import pixel_tables
    from robench.results.adversarial import parse_count
    from robench.results.tidy import tidy_frame
    from robench.results.writers import default_run_dir, prepare_run_dir, write_results

    counts = _ints(pixels, "pixels")
    if 0 in counts:
        raise UsageError("--pixels values must be >= 1")
    deltas = _ints(delta, "delta")
    if any(d > 255 for d in deltas):
        raise UsageError("--delta values must be in [0, 255]")
    if channels not in CHANNEL_MODES:
        raise UsageError(f"--channels must be one of {', '.join(CHANNEL_MODES)}, got {channels!r}")
    check_range("--trials", trials, 1, MAX_TRIALS)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    attack_eps = None
    if on_attack is not None:
        if on_attack.lower() != "fgsm":
            raise UsageError(f"--on-attack supports fgsm, got {on_attack!r}")
        if eps is None:
            raise UsageError("--on-attack needs --eps")
        attack_eps = eval_expr(eps)
        if not 0 < attack_eps <= 1:
            raise UsageError(f"--eps must be in (0, 1] pixel units, got {attack_eps:g}")
    elif eps is not None:
        raise UsageError("--eps is only used with --on-attack")
    resize, crop = input_geometry(input_size, resize, crop)
    check_pixel_limit(max_image_pixels)
    keep = parse_count(save_adversarial)  # before any work: a bad count is a usage error
    normalization = resolve_normalization(normalize, mean, std)
    loaded = load_model(model, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint,
                        weights=weights, dataset=dataset, threat_model=threat_model, model_dir=model_dir)
    if loaded.preprocessing is not None:
        # A model by name brings its preprocessing; explicit options still win.
        normalization = normalization if (normalize or mean or std) else loaded.preprocessing.normalization
        if resize is None and crop is None:
            resize, crop = loaded.preprocessing.resize, loaded.preprocessing.crop
    run_dir = prepare_run_dir(out if out else default_run_dir("pixel-index", loaded.name))
    doc = pixel_index_folder(
        loaded, folder, normalization=normalization, pixels=counts, settings=build_settings(deltas, _areas(area)),
        trials=trials, seed=seed, shared_positions=shared_positions, channels=channels, resize=resize, crop=crop,
        class_map=class_map, gray=gray, attack_eps=attack_eps, batch_size=batch_size, device=device,
        max_image_pixels=max_image_pixels, save_adversarial=keep, save_to=run_dir,
        warn=warn,
    )
    config = {"model": loaded.source, "arch": arch, "folder": str(folder), "pixels": counts, "delta": deltas,
              "area": _areas(area), "trials": trials, "seed": seed, "shared_positions": shared_positions,
              "channels": channels, "resize": resize, "crop": crop, "class_map": class_map, "gray": gray,
              "max_image_pixels": max_image_pixels,
              "normalization": normalization.as_dict() if normalization else None, "on_attack": on_attack,
              "eps": attack_eps, "device": device, "batch_size": batch_size,
              **({"save_adversarial": keep} if keep is not None else {})}
    write_results(run_dir, doc, tidy_frame(doc), config)
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
    if not quiet:
        stderr.print(f"results written to {run_dir}", highlight=False)
