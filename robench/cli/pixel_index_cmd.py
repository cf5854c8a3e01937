"""``robench pixel-index MODEL FOLDER``: random few-pixel changes and the Pixel-index."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from robench.cli.common import handle_errors, interrupt_on_sigterm, stderr, stdout_console, warn


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
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory (default runs/pixel-index/<model>/<UTC "
                                       "time>/); an interrupted run there is continued."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the interrupted run in this directory."),
    save_every: float = typer.Option(2.0, "--save-every", help="Seconds between progress saves (0: every batch)."),
    save_adversarial: Optional[str] = typer.Option(
        None, "--save-adversarial", metavar="[N|all]",
        help="Save the first N images (alone or all: every image) as changed by the first trial, per setting "
        "and pixel count, in adversarial/<setting>.npz with a PNG grid."),
    as_json: bool = typer.Option(False, "--json", help="Print only the results JSON to stdout."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print where the results were written."),
) -> None:
    """Misclassification under random few-pixel changes, and the Pixel-index Pi = w / (p r a)."""
    # Imported here, not at the top: building the command line (--help) must not load torch.
    from robench.tasks import Hooks
    from robench.tasks.pixel_index import PixelIndexConfig, PixelIndexTask
    from robench.tasks.rundir import RunDirectory

    config = PixelIndexConfig(
        pixels=pixels, delta=delta, area=area, channels=channels, trials=trials, batch_size=batch_size,
        save_every=save_every, on_attack=on_attack, eps=eps, input_size=input_size, resize=resize, crop=crop,
        max_image_pixels=max_image_pixels, save_adversarial=save_adversarial, normalize=normalize, mean=mean,
        std=std, model=model, folder=folder, arch=arch, num_classes=num_classes, weights=weights, dataset=dataset,
        threat_model=threat_model, model_dir=model_dir, trust_checkpoint=trust_checkpoint, seed=seed,
        shared_positions=shared_positions, class_map=class_map, gray=gray, device=device, out=out, resume=resume,
    )
    task = PixelIndexTask(config)
    directory = RunDirectory.open(task.resume_settings(), task.default_dir, out=config.out, resume=config.resume)
    if directory.resume_state is not None:
        stderr.print(f"robench: resuming {directory.path} after {directory.resume_state['clean_total']} finished "
                     "image(s)", highlight=False)
    # SIGTERM stops the run like Ctrl-C only while it computes: the last progress file is on disk
    # before the results are written, so a kill at any later moment still resumes to the end.
    with interrupt_on_sigterm():
        result = task.run(directory, Hooks(on_warning=warn))
    directory.finish(result)
    _print(result.doc, as_json)
    if not quiet:
        stderr.print(f"results written to {directory.path}", highlight=False)


def _print(doc: dict[str, Any], as_json: bool) -> None:
    from robench.pixels.report import pixel_tables

    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        return
    console = stdout_console()
    images = doc["images"]
    console.print(f"{images['evaluated']} of {images['read']} images evaluated: "
                  f"{images['excluded_misclassified']} excluded (misclassified before any change), "
                  f"{len(images['skipped'])} file(s) skipped", highlight=False)
    for table in pixel_tables(doc):
        console.print(table)
