"""The certification's results document (``robench.certify/1``) and its per-sample table.

* ``settings``: sigma, n0, n, alpha, the radii reported and the seed of the noise
* ``clean``: the base model's own accuracy on the clean samples (one plain forward pass)
* ``smoothed``: the smoothed classifier's accuracy by PREDICT; an abstention counts as wrong, and is
  also counted apart (``abstained``), as is a wrong class (``wrong``)
* ``certify``: CERTIFY's answers: ``correct`` (the label, certified at some radius >= 0), ``abstained``,
  ``wrong`` (another class certified), and the mean and median certified radius of the correct ones
* ``certified_accuracy``: per radius r, the share of samples CERTIFY answers correctly with a radius >= r
* ``progress``, ``model``, ``data``, ``env``, ``complete`` as in every document
"""

from __future__ import annotations

import statistics
from typing import Any

import pandas as pd
import torch

from robench.models.checkpoints import LoadedModel
from robench.models.preprocessing import Normalization
from robench.results.document import ABSENT, data_block, env_block, header, model_block
from robench.results.schema import CERTIFY_SCHEMA

__all__ = ["certify_document", "samples_table"]

# samples.csv: one row per sample; -1 marks an abstention, an empty radius one too.
SAMPLE_COLUMNS = ("index", "label", "base_prediction", "smoothed_prediction", "certified_class", "selected_count",
                  "p_lower", "radius", "correct")


def certify_document(columns: dict[str, list], total: int, loaded: LoadedModel, normalization: Normalization | None,
                     data: dict[str, Any], settings: dict[str, Any], device: torch.device, *, num_classes: int | None,
                     batch_size: int, seconds: float, complete: bool,
                     work_units: dict[str, Any] | None = None) -> dict[str, Any]:
    """The document of a finished or interrupted run from the finished samples' rows (``columns``, as
    ``robench.evaluation.certification.CertifiedSamples`` holds them) of ``total`` samples."""
    n = len(columns["index"])
    labels = columns["label"]
    base_correct = sum(p == y for p, y in zip(columns["base_prediction"], labels))
    return {
        **header(CERTIFY_SCHEMA, "certify", complete),
        "progress": {"evaluated": n, "total": total, "unit": "samples"},
        "model": model_block(loaded, num_classes=num_classes if num_classes is not None else ABSENT,
                             normalization=normalization),
        "data": data_block({"spec": data["spec"], "n": total}, data["fingerprint"]),
        "settings": dict(settings),
        "clean": {"accuracy": _share(base_correct, n), "n": n, "correct": base_correct},
        "smoothed": _answers(columns["smoothed_prediction"], labels),
        "certify": _certify_block(columns),
        "certified_accuracy": certified_accuracy(columns, settings["radii"]),
        "env": env_block(device, seed=settings["seed"], batch_size=batch_size, checkpoint_sha256=loaded.sha256,
                         dataset_fingerprint=data["fingerprint"], seconds=seconds,
                         processes=work_units["processes"] if work_units else ABSENT,
                         speed={"work_units": work_units} if work_units else ABSENT),
    }


def _share(count: int, n: int) -> float | None:
    return count / n if n else None


def _answers(answers: list[int], labels: list[int]) -> dict[str, Any]:
    """Correct, abstained (-1) and wrong answers; the accuracy counts an abstention as wrong."""
    n = len(answers)
    correct = sum(a == y for a, y in zip(answers, labels))
    abstained = sum(a == -1 for a in answers)
    return {"accuracy": _share(correct, n), "n": n, "correct": correct, "abstained": abstained,
            "wrong": n - correct - abstained}


def _correct_radii(columns: dict[str, list]) -> list[float]:
    return [r for c, y, r in zip(columns["certified_class"], columns["label"], columns["radius"]) if c == y]


def _certify_block(columns: dict[str, list]) -> dict[str, Any]:
    radii = _correct_radii(columns)
    return {**_answers(columns["certified_class"], columns["label"]),
            "mean_radius": statistics.fmean(radii) if radii else None,
            "median_radius": statistics.median(radii) if radii else None}


def certified_accuracy(columns: dict[str, list], radii: list[float]) -> list[dict[str, Any]]:
    """Per radius r: the samples CERTIFY answers with their label and a radius of at least r."""
    n = len(columns["index"])
    correct = _correct_radii(columns)
    rows = []
    for r in radii:
        count = sum(radius >= r for radius in correct)
        rows.append({"radius": r, "accuracy": _share(count, n), "correct": count})
    return rows


def samples_table(columns: dict[str, list]) -> pd.DataFrame:
    """samples.csv: the label, the base prediction, PREDICT's and CERTIFY's answers (-1: abstained), how many
    of the n estimation copies the model gave the class the selection copies chose, the lower bound on
    that class's probability, the certified radius (empty: abstained) and whether CERTIFY's answer is the
    label."""
    frame = pd.DataFrame({name: columns[name] for name in SAMPLE_COLUMNS if name in columns})
    frame["correct"] = [c == y for c, y in zip(columns["certified_class"], columns["label"])]
    return frame[list(SAMPLE_COLUMNS)]
