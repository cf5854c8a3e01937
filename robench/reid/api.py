"""``robench eval`` on a re-identification dataset: the results document."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from robench import __version__, distributed
from robench.models.loading import LoadedModel
from robench.models.preprocessing import Normalization
from robench.precision import device_name, resolve_device
from robench.reid.datasets import PATTERNS, ReIDData, load_reid
from robench.reid.engine import ReIDOptions, run_reid
from robench.reid.features import ReIDFeatures
from robench.results.schema import SCHEMA
from robench.suites import LoadedSuite

REID_KINDS = tuple(PATTERNS)
METRIC_KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def is_reid_spec(spec: str | None) -> bool:
    return bool(spec) and spec.partition(":")[0].lower() in REID_KINDS and ":" in spec


def load_reid_spec(spec: str, pattern: str | None = None) -> ReIDData:
    kind, _, root = spec.partition(":")
    return load_reid(kind.lower(), root, pattern)


def evaluate_reid(
    loaded: LoadedModel,
    data: ReIDData,
    suite: LoadedSuite,
    *,
    normalization: Normalization | None,
    options: ReIDOptions,
    surrogate: LoadedModel | None = None,
    surrogate_normalization: Normalization | None = None,
    feature_layer: str | None = None,
    surrogate_layer: str | None = None,
    flip: bool = False,
    l2: bool = False,
    device: str = "auto",
    on_step=None,
) -> dict[str, Any]:
    dev = distributed.local_device(resolve_device(device))
    target = ReIDFeatures(loaded.model, normalization, layer=feature_layer, flip=flip, l2=l2)
    sur = None
    if surrogate is not None:
        sur = ReIDFeatures(surrogate.model, surrogate_normalization, layer=surrogate_layer, flip=flip, l2=l2)
    if distributed.world()[1] > 1:
        with distributed.process_group(dev):
            outcome = run_reid(target, data, suite.suite, surrogate=sur, options=options, device=dev,
                               on_step=on_step if distributed.is_main_process() else None)
    else:
        outcome = run_reid(target, data, suite.suite, surrogate=sur, options=options, device=dev, on_step=on_step)
    import torchvision

    return {
        "schema": SCHEMA,
        "task": "reid",
        "complete": True,
        "model": {"name": loaded.name, "source": loaded.source, "arch": loaded.arch, "sha256": loaded.sha256,
                  "normalization": normalization.as_dict() if normalization else None,
                  "feature_layer": feature_layer, "flip": flip, "l2": l2},
        "surrogate": None if surrogate is None else {
            "name": surrogate.name, "source": surrogate.source, "arch": surrogate.arch, "sha256": surrogate.sha256},
        "suite": {"name": suite.suite.name, "source": suite.path, "sha256": suite.sha256},
        "data": {"spec": f"{data.kind}:{data.root}", "queries": len(data.query), "gallery": len(data.gallery),
                 "junk_excluded": data.junk, "skipped": data.skipped, "fingerprint": outcome.fingerprint},
        "protocol": {"distance": options.metric, "ranks": list(options.ranks), "ap_convention": options.ap,
                     "denominator": options.denominator, "perturb": options.perturb, "rerank": options.rerank},
        "clean": outcome.clean,
        "clean_reranked": outcome.clean_reranked,
        "attacks": outcome.attacks,
        "sanity": {"nonfinite_features": outcome.nonfinite_features},
        "env": {
            "robench": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "numpy": np.__version__, "device": str(dev),
            "device_name": device_name(dev), "precision": "fp32", "seed": options.seed,
            "batch_size": options.batch_size, "checkpoint_sha256": loaded.sha256,
            "processes": distributed.world()[1],
            "suite_sha256": suite.sha256, "dataset_fingerprint": outcome.fingerprint,
            "seconds": round(outcome.seconds, 3),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }


def reid_tidy_rows(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric, as for classification; ``ap`` names the AP convention of mAP rows."""
    model, suite = doc["model"]["name"], doc["suite"]["name"]
    rows = []

    def add(attack: str, label: str, eps: Any, metrics: dict | None, reranked: bool) -> None:
        if not metrics:
            return
        for key in METRIC_KEYS:
            if key in metrics and metrics[key] is not None:
                rows.append({"model": model, "suite": suite, "attack": attack, "label": label, "eps": eps,
                             "metric": key, "value": metrics[key], "n": metrics["queries"],
                             "ap_convention": metrics["ap_convention"], "reranked": reranked})

    add("clean", "clean", 0.0, doc["clean"], False)
    add("clean", "clean", 0.0, doc.get("clean_reranked"), True)
    for a in doc["attacks"]:
        add(a["attack"], a["label"], a["eps"], a, False)
        add(a["attack"], a["label"], a["eps"], a.get("reranked"), True)
    return rows
