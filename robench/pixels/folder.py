"""Pixel-index of a model on a folder of images: the document behind ``robench pixel-index``."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from robench import __version__
from robench.data.images import class_indices, load_folder, scan_folder
from robench.errors import UsageError
from robench.models.loading import LoadedModel
from robench.models.preprocessing import Normalization
from robench.models.wrapper import RobustModel
from robench.pixels.experiment import PixelSetting, experiments_document, run_pixel_experiments
from robench.precision import device_name, resolve_device

SCHEMA = "robench.pixel-index/1"


def pixel_index_folder(
    loaded: LoadedModel,
    folder: str | Path,
    *,
    normalization: Normalization | None,
    pixels: list[int],
    settings: list[PixelSetting],
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
) -> dict[str, Any]:
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
    if scan.class_structured:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            num_classes = model(images[:1].to(dev).float() / 255.0).shape[1]
            model.train(was_training)
        names = [scan.class_names[i] for i in kept]
        labels = torch.tensor(class_indices(names, num_classes, class_map), dtype=torch.long)
    counts = run_pixel_experiments(
        model, images, labels, pixels=pixels, settings=settings, trials=trials, seed=seed,
        shared_positions=shared_positions, channels=channels, attack_eps=attack_eps, batch_size=batch_size,
        device=dev, on_batch=on_batch,
    )
    if counts.evaluated == 0:
        raise UsageError(f"no image of {scan.root} is classified correctly by the model before the change "
                         f"({counts.clean_total} read); check --class-map and the preprocessing options")
    h, w = images.shape[2:]
    import torchvision

    return {
        "schema": SCHEMA,
        "task": "pixel-index",
        "complete": True,
        "model": {"name": loaded.name, "source": loaded.source, "arch": loaded.arch, "sha256": loaded.sha256,
                  "normalization": normalization.as_dict() if normalization else None},
        "data": {
            "folder": str(folder), "image_files": len(scan.files), "read": len(kept), "input_size": [int(h), int(w)], "fingerprint": counts.fingerprint,
            "reference": "folder labels" if labels is not None else "clean prediction",
        },
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
        "env": {
            "robench": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "numpy": np.__version__, "device": str(dev),
            "device_name": device_name(dev), "seed": seed, "batch_size": batch_size,
            "checkpoint_sha256": loaded.sha256, "dataset_fingerprint": counts.fingerprint,
            "seconds": round(counts.seconds, 3), "forward_images": counts.forward_images,
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }


def tidy_pixel_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric, like classification results: pandas pivots them into Tables 6-9."""
    rows = []
    model = doc["model"]["name"]
    for exp in doc["experiments"]:
        for r in exp["results"]:
            for metric in ("misclassified", "recognition_rate", "pi"):
                if r.get(metric) is not None:
                    rows.append({"model": model, "experiment": exp["experiment"], "setting": exp["setting"],
                                 "pixels": r["pixels"], "metric": metric, "value": r[metric], "n": r["total"]})
    return rows
