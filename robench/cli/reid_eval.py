"""The re-identification branch of ``robench eval`` (a ReID dataset or a ``task: reid`` suite)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd

from robench import distributed
from robench.cli.common import stderr, stdout_console
from robench.errors import UsageError
from robench.models import load_model, resolve_normalization
from robench.models.loading import LoadedModel
from robench.models.preprocessing import Normalization
from robench.reid.api import evaluate_reid, is_reid_spec, load_reid_spec, reid_tidy_rows
from robench.reid.engine import ReIDOptions
from robench.reid.report import reid_table
from robench.results.writers import write_results
from robench.suites import LoadedSuite

CHOICES = {"distance": ("euclidean", "cosine"), "ap": ("noninterp", "trapezoid"),
           "denominator": ("valid", "all"), "perturb": ("query", "gallery")}


def _choice(name: str, value: str) -> str:
    if value not in CHOICES[name]:
        raise UsageError(f"--{name} must be one of {', '.join(CHOICES[name])}, got {value!r}")
    return value


def _size(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    rows, _, cols = text.lower().partition("x")
    if not (rows.isdigit() and cols.isdigit() and int(rows) > 0 and int(cols) > 0):
        raise UsageError(f"--image-size takes HxW, e.g. 256x128, got {text!r}")
    return int(rows), int(cols)


def _ranks(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"--ranks takes comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise UsageError(f"--ranks values must be >= 1, got {text!r}")
    return values


def run_reid_eval(loaded: LoadedModel, data_spec: str, suite: LoadedSuite, run_dir: Path, *,
                  normalization: Normalization | None, trust_checkpoint: bool, feature_layer: str | None,
                  flip: bool, l2: bool, distance: str, ranks: str, ap: str, denominator: str, rerank: bool,
                  perturb: str, surrogate: str | None, surrogate_arch: str | None,
                  surrogate_num_classes: int | None, image_size: str | None, reid_pattern: str | None,
                  device: str, batch_size: int | str, seed: int, workers: int, as_json: bool, quiet: bool) -> None:
    if not is_reid_spec(data_spec):
        raise UsageError(f"suite {suite.suite.name} is for re-identification: pass --data market1501:ROOT, "
                         "dukemtmc:ROOT or reid:ROOT")
    if batch_size == "auto":
        batch_size = 64  # feature extraction and ranking attacks: a safe size on any GPU
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    options = ReIDOptions(metric=_choice("distance", distance), ranks=_ranks(ranks), ap=_choice("ap", ap),
                          denominator=_choice("denominator", denominator), rerank=rerank,
                          perturb=_choice("perturb", perturb), size=_size(image_size), batch_size=batch_size,
                          workers=workers, seed=seed)
    data = load_reid_spec(data_spec, reid_pattern)
    if data.skipped and not quiet:
        stderr.print(f"robench: warning: skipped {len(data.skipped)} file(s) whose names do not match the "
                     "pattern (listed in results.json)", highlight=False)
    sur_spec = suite.suite.surrogate
    sur_loaded, sur_norm, sur_layer = None, None, None
    if surrogate or sur_spec:
        path = surrogate or sur_spec.model
        arch = surrogate_arch or (sur_spec.arch if sur_spec else None)
        classes = surrogate_num_classes or (sur_spec.num_classes if sur_spec else None)
        # Same rule as the target: TorchScript and pickled modules need --trust-checkpoint.
        sur_loaded = load_model(path, arch=arch, num_classes=classes, trust_checkpoint=trust_checkpoint,
                                arch_option="--surrogate-arch (or surrogate.arch in the suite)")
        sur_norm = resolve_normalization(sur_spec.normalize, None, None) if sur_spec and sur_spec.normalize \
            else normalization
        sur_layer = sur_spec.feature_layer if sur_spec else None
    doc = evaluate_reid(
        loaded, data, suite, normalization=normalization, options=options, surrogate=sur_loaded,
        surrogate_normalization=sur_norm, feature_layer=feature_layer, surrogate_layer=sur_layer, flip=flip, l2=l2,
        device=device, on_step=None if quiet else (lambda m: stderr.print(f"robench: {m}", highlight=False)),
    )
    if not distributed.is_main_process():
        return  # under torchrun only rank 0 writes
    config = {"model": loaded.source, "arch": loaded.arch, "data": data_spec, "suite": suite.suite.model_dump(
        mode="json"), "surrogate": sur_loaded.source if sur_loaded else None, "options": {
        **options.__dict__, "ranks": list(options.ranks), "size": list(options.size) if options.size else None},
        "feature_layer": feature_layer, "flip": flip, "l2": l2, "device": device}
    write_results(run_dir, doc, pd.DataFrame(reid_tidy_rows(doc)), config)
    if as_json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        stdout_console().print(reid_table(doc))
    stderr.print(f"results written to {run_dir}", highlight=False)
