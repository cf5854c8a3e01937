"""The Pixel-index results document (schema ``robench.pixel-index/1``): built from a run's counts and
the images it read, on the shared blocks of :mod:`robench.results.document`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from robench.models.loading import LoadedModel
from robench.models.preprocessing import Normalization
from robench.pixels.experiment import PixelCounts, PixelSetting
from robench.pixels.index import pixel_index_terms
from robench.pixels.perturb import value_range
from robench.results.document import ABSENT, data_block, env_block, header, model_block
from robench.results.schema import PIXEL_SCHEMA

PIXEL_TERMS = ("w", "p", "r", "a", "pi")


@dataclass(frozen=True)
class FolderImages:
    """What the document says about the folder, apart from the counts of the run."""

    folder: str
    image_files: int  # files that looked like images
    read: int  # of them, readable at the common size
    input_size: tuple[int, int]
    labelled: bool  # class sub-folders give the labels; otherwise the clean prediction is the reference
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: list[dict[str, str]] = field(default_factory=list)


def pixel_index_document(counts: PixelCounts, loaded: LoadedModel, normalization: Normalization | None,
                         images: FolderImages, settings: list[PixelSetting], run_settings: dict[str, Any],
                         device: torch.device, batch_size: int, *, complete: bool,
                         work_units: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results document of a finished or an interrupted run (``progress``: images finished of those read).

    ``run_settings`` is the document's ``settings`` block: pixels, trials, seed, shared_positions,
    channels and attack_eps. ``work_units``: a work-queue job's (``Queued.facts``), which ``env`` records
    with its number of processes, as classification does; a single-process run's ``env`` has neither.
    """
    seed, attack_eps = run_settings["seed"], run_settings["attack_eps"]
    return {
        **header(PIXEL_SCHEMA, "pixel-index", complete),
        "progress": {"evaluated": counts.clean_total, "total": images.read, "unit": "images"},
        "model": model_block(loaded, normalization=normalization),
        "data": data_block({"folder": images.folder, "image_files": images.image_files, "read": images.read,
                            "input_size": list(images.input_size)}, counts.fingerprint,
                           {"reference": "folder labels" if images.labelled else "clean prediction"}),
        "images": {
            "read": images.read,
            "evaluated": counts.evaluated,
            "excluded_misclassified": counts.clean_total - counts.clean_correct,
            "skipped": images.skipped,
            "converted": images.converted,
        },
        "clean": {"accuracy": counts.clean_correct / counts.clean_total if images.labelled and counts.clean_total
                  else None, "n": counts.clean_total, "correct": counts.clean_correct},
        "settings": dict(run_settings),
        "experiments": experiments_document(counts, settings, run_settings["pixels"], images.input_size, attack_eps),
        "env": env_block(device, seed=seed, batch_size=batch_size, checkpoint_sha256=loaded.sha256,
                         dataset_fingerprint=counts.fingerprint, seconds=counts.seconds,
                         forward_images=counts.forward_images,
                         processes=work_units["processes"] if work_units else ABSENT,
                         speed={"work_units": work_units} if work_units else ABSENT),
    }


def experiments_document(counts: PixelCounts, settings: list[PixelSetting], pixels: list[int],
                         image_hw: tuple[int, int], attack_eps: float | None) -> list[dict[str, Any]]:
    """One object per setting: per pixel count, misclassified (mean over trials), w, p, r, a, pi."""
    experiments = [_setting_experiment(counts, si, s, pixels, image_hw) for si, s in enumerate(settings)]
    if attack_eps is not None:
        experiments.append(_attack_experiment(counts, pixels, attack_eps))
    return experiments


def _setting_experiment(counts: PixelCounts, index: int, setting: PixelSetting, pixels: list[int],
                        image_hw: tuple[int, int]) -> dict[str, Any]:
    h, w = image_hw
    total = counts.evaluated
    vr = value_range(setting.delta)
    area_pixels = setting.area[0] * setting.area[1] if setting.area else None
    rows = []
    for n in pixels:
        row = _trial_row(n, counts.counts.get((index, n), torch.zeros(1)), total)
        # A partial run may not have evaluated an image yet: no fraction of nothing.
        terms = pixel_index_terms(row["misclassified"], total, n, h * w, vr, area_pixels) if total else \
            dict.fromkeys(PIXEL_TERMS)
        rows.append({**row, **terms})
    return {"experiment": setting.experiment, "setting": setting.label, "delta": setting.delta,
            "area": list(setting.area) if setting.area else None, "value_range": vr, "results": rows}


def _attack_experiment(counts: PixelCounts, pixels: list[int], attack_eps: float) -> dict[str, Any]:
    """Table 9: misclassified is "still fooled after the change", the rate "returned to the correct class"."""
    rows = [_trial_row(n, counts.adversarial_counts.get(n, torch.zeros(1)), counts.adversarial) for n in pixels]
    return {"experiment": "attack", "setting": "fgsm", "attack": "fgsm", "eps": attack_eps,
            "adversarial": counts.adversarial, "results": rows}


def _trial_row(n: int, per_trial: torch.Tensor, total: int) -> dict[str, Any]:
    mean = float(per_trial.float().mean())
    return {
        "pixels": n,
        "misclassified": mean,
        "misclassified_trials": [int(v) for v in per_trial],
        "misclassified_std": float(per_trial.float().std()) if len(per_trial) > 1 else 0.0,
        "total": total,
        "recognition_rate": 1.0 - mean / total if total else None,
    }
