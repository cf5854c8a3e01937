"""Pixel-index of a model on a folder of images: the document behind ``robench pixel-index``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

import numpy as np

from robench.config import as_loaded_model
from robench.data.images import class_indices, load_folder, scan_folder
from robench.errors import UsageError
from robench.models.loading import LoadedModel
from robench.models.preprocessing import PRESETS, Normalization
from robench.models.wrapper import RobustModel
from robench.pixels.examples import pixel_examples
from robench.pixels.experiment import PixelSetting, build_settings, experiments_document, run_pixel_experiments
from robench.reporting.adversarial_grid import save_examples
from robench.results.adversarial import parse_count
from robench.evaluation.precision import resolve_device
from robench.results.document import PIXEL_SCHEMA, data_block, env_block, header, model_block


def pixel_index_folder(
    model: nn.Module | LoadedModel | str,
    folder: str | Path,
    *,
    pixels: list[int],
    normalization: Normalization | str | None = None,
    settings: list[PixelSetting] | None = None,
    trials: int = 1,
    seed: int = 0,
    shared_positions: bool = False,
    channels: str = "all",
    resize: int | None = None,
    crop: int | None = None,
    class_map: str | None = None,
    gray: bool | None = None,
    max_image_pixels: int | None = None,
    attack_eps: float | None = None,
    batch_size: int = 256,
    device: str = "auto",
    on_batch: Callable[[int], None] | None = None,
    warn: Callable[[str], None] | None = None,
    trust_checkpoint: bool = False,
    save_adversarial: int | str | None = None,
    save_to: str | Path | None = None,
) -> dict[str, Any]:
    """The Pixel-index of ``model`` on the images of ``folder`` (class sub-folders, or flat).

    ``pixels`` lists how many pixels each trial changes; ``settings`` (see
    ``build_settings``) adds the fixed-delta and area experiments to the full-range
    one. Returns the results document of ``robench pixel-index``.

    ``save_adversarial`` (a number of images, or 0 or ``"all"``) writes the first images as changed by
    the first trial, per setting and pixel count, to ``<save_to>/adversarial/`` (npz and PNG grid).
    """
    keep = parse_count(save_adversarial)
    if keep is not None and save_to is None:
        raise UsageError("save_adversarial needs save_to, the directory to write adversarial/ into")
    loaded = as_loaded_model(model, trust_checkpoint=trust_checkpoint)
    settings = settings if settings is not None else build_settings([], [])
    normalization = PRESETS.get(normalization) if isinstance(normalization, str) else normalization
    scan = scan_folder(folder)
    images, kept = load_folder(scan, resize, crop, gray, max_image_pixels)
    if scan.skipped and warn:
        warn(f"skipped {len(scan.skipped)} file(s) that are not readable images (listed in results.json)")
    if scan.converted and warn and gray is None:  # forced conversions were asked for: no warning
        target = "grayscale" if images.shape[1] == 1 else "RGB"
        warn(f"converted {len(scan.converted)} image(s) to {target}, the channels of most images "
             "(listed in results.json under images.converted; --gray/--rgb chooses)")
    dev = resolve_device(device)
    model = RobustModel(loaded.model, normalization).to(dev)
    labels = None
    class_names = None
    if scan.class_structured:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            num_classes = model(images[:1].to(dev).float() / 255.0).shape[1]
            model.train(was_training)
        names = [scan.class_names[i] for i in kept]
        indices = class_indices(names, num_classes, class_map)
        labels = torch.tensor(indices, dtype=torch.long)
        class_names = _class_names(names, indices, num_classes)
    counts = run_pixel_experiments(
        model, images, labels, pixels=pixels, settings=settings, trials=trials, seed=seed,
        shared_positions=shared_positions, channels=channels, attack_eps=attack_eps, batch_size=batch_size,
        device=dev, on_batch=on_batch,
    )
    if counts.evaluated == 0:
        raise UsageError(f"no image of {scan.root} is classified correctly by the model before the change "
                         f"({counts.clean_total} read); check --class-map and the preprocessing options")
    if keep is not None:
        examples = pixel_examples(model, images, labels, count=keep, pixels=pixels, settings=settings, seed=seed,
                                  shared_positions=shared_positions, channels=channels, batch_size=batch_size,
                                  device=dev)
        for ex in examples:  # which file each saved image came from
            ex.extra["source_file"] = np.array([_relative(scan.files[i], scan.root) for i in kept[:len(ex.index)]])
        save_examples(Path(save_to), examples, class_names)
    h, w = images.shape[2:]
    return {
        **header(PIXEL_SCHEMA, "pixel-index", True),
        "model": model_block(loaded, normalization=normalization),
        "data": data_block({"folder": str(folder), "image_files": len(scan.files), "read": len(kept),
                            "input_size": [int(h), int(w)]}, counts.fingerprint,
                           {"reference": "folder labels" if labels is not None else "clean prediction"}),
        "images": {
            "read": len(kept),
            "evaluated": counts.evaluated,
            "excluded_misclassified": counts.clean_total - counts.clean_correct,
            "skipped": scan.skipped,
            "converted": scan.converted,
        },
        "clean": {"accuracy": counts.clean_correct / counts.clean_total if labels is not None else None,
                  "n": counts.clean_total, "correct": counts.clean_correct},
        "settings": {"pixels": pixels, "trials": trials, "seed": seed, "shared_positions": shared_positions,
                     "channels": channels, "attack_eps": attack_eps},
        "experiments": experiments_document(counts, settings, pixels, (int(h), int(w)), attack_eps),
        "env": env_block(dev, seed=seed, batch_size=batch_size, checkpoint_sha256=loaded.sha256,
                         dataset_fingerprint=counts.fingerprint, seconds=counts.seconds,
                         forward_images=counts.forward_images),
    }


def _class_names(folders: list[str], indices: list[int], num_classes: int) -> list[str]:
    """The model's classes named by the folders mapped to them (the index itself where none is)."""
    names = [str(k) for k in range(num_classes)]
    for folder, k in zip(folders, indices):
        names[k] = folder
    return names


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:  # a file reached through a link outside the folder
        return str(path)
