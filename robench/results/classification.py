"""The classification results document: built from a run's outcome on the shared blocks of
:mod:`robench.results.document`, with the per-sample table beside it."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from robench.data.sources import ImageDataset
from robench.evaluation import distributed
from robench.evaluation.findings import named_flags
from robench.evaluation.state import RunOutcome, accuracy_of
from robench.metrics import MetricCollection
from robench.models.loading import LoadedModel
from robench.models.preprocessing import Normalization
from robench.results.adversarial import SavedExamples, saved_summaries
from robench.results.document import data_block, env_block, header, model_block, suite_block
from robench.results.minimum_norm import median_of
from robench.results.schema import SCHEMA
from robench.suites import LoadedSuite


def classification_document(outcome: RunOutcome, loaded: LoadedModel, norm: Normalization | None, suite: LoadedSuite,
              dataset: ImageDataset, device: torch.device, precision: str, seed: int, batch_size: int,
              data: Any) -> dict[str, Any]:
    """The results document of a finished or an interrupted classification run."""
    state = outcome.state
    attacks = [_attack_entry(e, counts, suite, outcome) for e, counts in outcome.with_entries()]
    minimal = _minimum_norm_blocks(outcome, attacks)
    accs = [a["accuracy"] for a in attacks if a["accuracy"] is not None]
    robust_all = state.robust_all()
    # No sample finished yet (interrupted during the first segment): no accuracy, not NaN.
    robust = float(robust_all.mean()) if robust_all is not None and len(robust_all) else None
    return {
        **header(SCHEMA, "classification", outcome.complete),
        "progress": {"evaluated": state.n, "total": outcome.total},
        "model": model_block(loaded, num_classes=state.num_classes, normalization=norm, **loaded.provenance()),
        "suite": suite_block(suite.suite.name, suite.path, suite.sha256, eps_space=suite.suite.eps_space,
                             overrides=suite.overrides),
        "data": data_block({"spec": data if isinstance(data, str) else dataset.name, "n": state.n},
                           outcome.fingerprint, {"skipped": dataset.skipped, "converted": dataset.converted}),
        "clean": {"accuracy": state.clean.compute(), "n": state.clean.total, "correct": state.clean.correct},
        "attacks": attacks,
        "robust_accuracy": robust,
        "mean_attack_accuracy": sum(accs) / len(accs) if accs else None,
        **({"min_norm": minimal} if minimal else {}),  # documents of other suites are as they always were
        "sanity": _sanity(outcome, attacks),
        "env": env_block(device, precision=precision, seed=seed, batch_size=batch_size,
                         checkpoint_sha256=loaded.sha256, processes=distributed.world()[1], speed=outcome.speed,
                         suite_sha256=suite.sha256, dataset_fingerprint=outcome.fingerprint,
                         seconds=outcome.seconds),
    }


def _attack_entry(e: Any, counts: MetricCollection, suite: LoadedSuite, outcome: RunOutcome) -> dict[str, Any]:
    has_gradient = _entry_has_gradient(e, outcome.state.sanity)
    accuracy, fooled = accuracy_of(counts, "accuracy"), accuracy_of(counts, "fooled")
    return {
        "attack": e.attack.name,
        "label": e.spec.display_name(),
        "norm": e.attack.norm,
        "eps": e.eps,
        "eps_space": suite.suite.eps_space,
        "accuracy": accuracy.compute(),
        "success_rate": fooled.compute(),
        "n": accuracy.total,
        "attacked": fooled.total,
        "params": e.params(),
        "seconds": round(counts.seconds.compute(), 4),
        "gradient_evals": counts.gradient_evals.compute(),
        "peak_memory_bytes": counts.peak_memory.compute(),
        "attack_chunk": counts.chunk.compute(),
        # Gradient attacks on a model without an input gradient take no step: an upper bound.
        "input_gradient": has_gradient if e.attack.family == "gradient" else None,
        **({"parts": _parts_log(e.attack.parts(), counts)} if e.attack.parts() else {}),
    }


def _minimum_norm_blocks(outcome: RunOutcome, attacks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per suite entry of a minimum-norm attack: its minimal perturbations and the curve read from them.

    ``norms`` are the attacked (clean-correct) samples' smallest adversarial perturbations that were found,
    sorted: with ``attacked`` and ``n`` they give the robust accuracy at any eps, (attacked - found + the
    norms larger than eps) / n. ``median_norm`` is over the attacked samples, a sample without an
    adversarial example counting as larger than any; null when that median is unbounded or none was attacked.
    """
    state = outcome.state
    correct = state.per_sample("pred") == state.per_sample("labels")
    blocks: dict[int, dict[str, Any]] = {}
    for (e, counts), row in zip(outcome.with_entries(), attacks):
        if not e.attack.minimum_norm:
            continue
        point = {"eps": e.eps, "accuracy": row["accuracy"]}
        if id(e.spec) in blocks:
            blocks[id(e.spec)]["curve"].append(point)
            continue
        norms = _entry_norms(counts)[correct] if len(correct) else np.zeros(0)
        found = [float(v) for v in np.sort(norms[np.isfinite(norms)])]
        median = median_of(found, len(norms))
        params = {k: v for k, v in row["params"].items() if k != "eps_expr"}
        blocks[id(e.spec)] = {"attack": row["attack"], "label": row["label"], "norm": row["norm"],
                              "eps_space": row["eps_space"], "params": params, "n": row["n"],
                              "attacked": len(norms), "found": len(found),
                              "median_norm": median if median is not None and math.isfinite(median) else None,
                              "norms": found, "curve": [point]}
    return list(blocks.values())


def _entry_norms(counts: MetricCollection) -> np.ndarray:
    """A minimum-norm entry's per-sample norms (float64; empty for a state that holds no samples)."""
    norms = counts.metrics.get("norms")
    return norms.compute().numpy().astype(np.float64) if norms is not None else np.zeros(0)


def _entry_has_gradient(e: Any, sanity: dict[str, Any]) -> bool:
    """Whether the entry's attacks saw an input gradient: the model's, or under BPDA its setting's probe."""
    if e.spec.bpda:
        written = [spec.model_dump(mode="json") for spec in e.spec.bpda]
        probe = next((p for p in sanity.get("bpda") or [] if p["modules"] == written), None)
        if probe is not None:
            return bool(probe["input_gradient"])
    return sanity.get("input_gradient", True) is not False


def _parts_log(parts: list[str], counts: MetricCollection) -> list[dict[str, Any]]:
    """A composite attack's log (AutoAttack's): per part, the points it broke first and the accuracy after it."""
    found = counts.found_by.compute()
    accuracy = accuracy_of(counts, "accuracy")
    n = accuracy.total
    broken = [int((found == k).sum()) for k in range(len(parts))]
    robust = accuracy.correct
    log = []
    for k, name in enumerate(parts):
        # Robust after part k: robust at the end, plus what the later parts broke.
        after = robust + sum(broken[k + 1:])
        log.append({"attack": name, "broken": broken[k], "accuracy_after": after / n if n else None})
    return log


def _sanity(outcome: RunOutcome, attacks: list[dict[str, Any]]) -> dict[str, Any]:
    report = {**outcome.state.sanity, "nonfinite_logits": outcome.state.nonfinite}
    named = named_flags(report, attacks)
    report["flags"] = [message for _, message in named]
    report["flag_names"] = [name for name, _ in named]  # aligned with flags; stable for gates
    return report


def add_saved_counts(doc: dict[str, Any], examples: list[SavedExamples]) -> None:
    """``saved_examples`` on each attack entry of a run that saved examples (other documents are unchanged):
    ``file`` (the npz, relative to the run directory), ``n`` saved samples, ``attacked`` among them,
    ``fooled_run`` (the run's successes there: what ``adversarial_float`` reproduces), ``fooled_8bit``
    (attacked samples whose 8-bit image is misclassified) and ``undone_8bit`` (run successes the 8-bit
    image loses)."""
    for entry, saved in zip(doc["attacks"], saved_summaries(examples)):  # both in entry order
        entry["saved_examples"] = saved


def class_names(dataset: ImageDataset, num_classes: int) -> list[str] | None:
    """The data's class names (torchvision datasets have them), when they fit the model's classes."""
    names = getattr(dataset.base, "classes", None)
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        return None
    return list(names) if len(names) == num_classes else None


def samples_frame(outcome: RunOutcome) -> pd.DataFrame:
    """One row per evaluated sample: its label, clean prediction and, per entry, robust or not."""
    state = outcome.state
    labels, pred = state.per_sample("labels"), state.per_sample("pred")
    frame = {"index": state.per_sample("index"), "label": labels, "clean_pred": pred, "clean_correct": pred == labels}
    measured: set[int] = set()
    for e, counts in outcome.with_entries():
        column = f"[{e.index}]:{e.spec.display_name()}@{e.eps_text}"
        frame[f"robust{column}"] = counts.robust.compute().numpy().astype(bool)
        if e.attack.minimum_norm and id(e.spec) not in measured:  # once per suite entry: every eps reads it
            measured.add(id(e.spec))
            # 0: misclassified clean; inf: no adversarial example found
            frame[f"min_norm[{e.index}]:{e.spec.display_name()}"] = _entry_norms(counts)
        parts = e.attack.parts()
        if parts:  # the part that broke each sample ("" where none did)
            names = np.array(["", *parts], dtype=object)
            frame[f"found_by{column}"] = names[counts.found_by.compute().numpy().astype(np.int64) + 1]
    robust_all = state.robust_all()
    if robust_all is not None:
        frame["robust_all"] = robust_all
    return pd.DataFrame(frame)
