"""A run's results as data: the outcome, progress snapshots for --resume, and merging shards."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from robench.entries import Entry
from robench.errors import UsageError
from robench.metrics import Accuracy, Collected


@dataclass
class RunOutcome:
    n: int
    clean: Accuracy
    entries: list[Entry]
    sample_index: np.ndarray
    labels: np.ndarray
    clean_pred: np.ndarray
    robust_all: np.ndarray | None
    fingerprint: str
    num_classes: int
    seconds: float
    nonfinite_logits: int
    complete: bool = True
    total: int = 0  # samples in the dataset (n counts the evaluated ones)
    sanity: dict = field(default_factory=dict)
    speed: dict = field(default_factory=dict)
    batch_size: int = 0  # the batch size used (resolved when asked for "auto")


def outcome_state(o: "RunOutcome") -> dict:
    """A run's per-sample results and counts, to be gathered from other processes."""
    return {"clean": [o.clean.correct, o.clean.total], "index": o.sample_index, "labels": o.labels,
            "pred": o.clean_pred, "robust_all": o.robust_all, "nonfinite": o.nonfinite_logits,
            "num_classes": o.num_classes, "seconds": o.seconds, "sanity": o.sanity,
            "entries": [{"accuracy": [e.accuracy.correct, e.accuracy.total], "fooled": [e.fooled.correct,
                         e.fooled.total], "robust": e.robust.compute(), "seconds": e.seconds,
                         "gradient_evals": e.gradient_evals, "peak_memory": e.peak_memory, "chunk": e.chunk}
                        for e in o.entries]}


def merge_outcomes(template: "RunOutcome", states: list[dict], fingerprint: str, total: int) -> "RunOutcome":
    """Shards in rank order -> one outcome, as if a single process had run the whole set."""
    clean = Accuracy()
    clean.correct = sum(s["clean"][0] for s in states)
    clean.total = sum(s["clean"][1] for s in states)
    for j, entry in enumerate(template.entries):
        parts = [s["entries"][j] for s in states]
        entry.accuracy, entry.fooled, entry.robust = Accuracy(), Accuracy(), Collected()
        entry.accuracy.correct = sum(p["accuracy"][0] for p in parts)
        entry.accuracy.total = sum(p["accuracy"][1] for p in parts)
        entry.fooled.correct = sum(p["fooled"][0] for p in parts)
        entry.fooled.total = sum(p["fooled"][1] for p in parts)
        for p in parts:
            entry.robust.update(p["robust"])
        entry.seconds = max(p["seconds"] for p in parts)  # wall time: the shards run side by side
        entry.gradient_evals = sum(p["gradient_evals"] for p in parts)
        peaks = [p["peak_memory"] for p in parts if p["peak_memory"] is not None]
        entry.peak_memory = max(peaks) if peaks else None
        chunks = [p["chunk"] for p in parts if p["chunk"] is not None]
        entry.chunk = min(chunks) if chunks else None
    cat = lambda key: np.concatenate([s[key] for s in states]) if states[0][key] is not None else None  # noqa: E731
    return RunOutcome(
        n=clean.total, clean=clean, entries=template.entries, sample_index=cat("index"), labels=cat("labels"),
        clean_pred=cat("pred"), robust_all=cat("robust_all"), fingerprint=fingerprint,
        num_classes=states[0]["num_classes"], seconds=max(s["seconds"] for s in states),
        nonfinite_logits=sum(s["nonfinite"] for s in states), total=total, sanity=states[0]["sanity"],
        speed=template.speed, batch_size=template.batch_size,
    )


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM during a run: ``outcome`` holds the finished batches (complete=False)."""

    def __init__(self, outcome: "RunOutcome") -> None:
        super().__init__("the run was interrupted")
        self.outcome = outcome


PROGRESS_FORMAT = "robench.progress/2"


def snapshot(batches: int, batch_size: int, num_classes: int, nonfinite: int, clean: Accuracy,
             entries: list[Entry], idx_parts: Collected, y_parts: Collected, pred_parts: Collected,
             robust_all: Collected, sanity: dict, data_digest: str) -> dict:
    """Everything the finished batches produced, as plain tensors and numbers (torch.save-able).

    ``sanity`` is the first batch's report (a resumed run does not see that batch
    again) and ``data_digest`` hashes the finished batches' data, so a resume can
    tell that the data changed under the same name.
    """
    return {
        "format": PROGRESS_FORMAT, "batches": batches, "batch_size": batch_size, "num_classes": num_classes,
        "nonfinite": nonfinite, "clean": [clean.correct, clean.total],
        "index": idx_parts.compute(), "labels": y_parts.compute(), "pred": pred_parts.compute(),
        "robust_all": robust_all.compute(), "sanity": dict(sanity), "data_digest": data_digest,
        "entries": [{"accuracy": [e.accuracy.correct, e.accuracy.total], "fooled": [e.fooled.correct, e.fooled.total],
                     "robust": e.robust.compute(), "seconds": e.seconds, "gradient_evals": e.gradient_evals,
                     "peak_memory": e.peak_memory, "chunk": e.chunk} for e in entries],
    }


def restore(state: dict, batch_size: int, clean: Accuracy, entries: list[Entry], idx_parts: Collected,
            y_parts: Collected, pred_parts: Collected, robust_all: Collected, sanity: dict) -> tuple[int, int, int]:
    """Load a snapshot into the accumulators and ``sanity``; returns (batches, classes, non-finite count)."""
    check_format(state)
    if state["batch_size"] != batch_size:
        raise UsageError(f"cannot resume: the run used --batch-size {state['batch_size']}, not {batch_size}")
    if len(state["entries"]) != len(entries):
        raise UsageError("cannot resume: the suite has changed since the interrupted run")
    clean.correct, clean.total = state["clean"]
    for part, key in ((idx_parts, "index"), (y_parts, "labels"), (pred_parts, "pred"), (robust_all, "robust_all")):
        part.update(state[key])
    for e, saved in zip(entries, state["entries"]):
        e.accuracy.correct, e.accuracy.total = saved["accuracy"]
        e.fooled.correct, e.fooled.total = saved["fooled"]
        e.robust.update(saved["robust"])
        e.seconds, e.gradient_evals = saved["seconds"], saved["gradient_evals"]
        e.peak_memory, e.chunk = saved["peak_memory"], saved["chunk"]
    sanity.update(state["sanity"])
    return state["batches"], state["num_classes"], state["nonfinite"]


def check_format(state: dict) -> None:
    found = state.get("format") if isinstance(state, dict) else None
    if found == "robench.progress/1":
        raise UsageError("cannot resume: the progress file was written by an older robench (robench.progress/1), "
                         "which did not record the data's digest or the sanity checks; start a new run with "
                         "another --out")
    if found != PROGRESS_FORMAT:
        raise UsageError("cannot resume: the progress file is not robench's")
