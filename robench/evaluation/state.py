"""A run's results as data: one ``RunState`` for everything a run accumulates.

Snapshots for ``--resume``, merging torchrun shards and the gather between
processes all go through the metrics' ``state_dict``/``load_state_dict``/
``merge``: no counter is copied by hand.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from robench.evaluation.entries import Entry
from robench.errors import UsageError
from robench.metrics import Accuracy, Collected, MetricCollection, Scalar

PROGRESS_FORMAT = "robench.progress/3"


def entry_metrics(minimum_norm: bool = False) -> MetricCollection:
    """What a run counts for one suite entry (its configuration is the ``Entry``); a minimum-norm attack's
    entry also keeps each sample's smallest adversarial perturbation (``norms``)."""
    norms = {"norms": Collected()} if minimum_norm else {}  # other entries' states are as they always were
    return MetricCollection(
        accuracy=Accuracy(),  # robust among all samples
        fooled=Accuracy(),  # success among the attacked (clean-correct) samples
        robust=Collected(),  # per-sample robust flags
        seconds=Scalar("sum", reduce="max", default=0.0),  # a process adds its batches; shards run side by side
        gradient_evals=Scalar("sum"),
        peak_memory=Scalar("max", default=None),  # bytes, GPU only
        chunk=Scalar("min", default=None),  # set when out-of-memory forced smaller attack chunks
        found_by=Collected(),  # composite attacks: per sample, the part that fooled it (-1: none)
        **norms,  # float64 per sample: 0 misclassified clean, inf where none was found
    )


def example_metrics(entries: int) -> MetricCollection:
    """``--save-adversarial``: the first N samples' clean images and, per entry j, the adversarial
    images (``adversarial{j}``) as the run scored them (float), and the model's prediction of each
    image's 8-bit rounding (``clean_pred``, ``adv_pred{j}``): the files keep both."""
    per_entry = {}
    for j in range(entries):
        per_entry[f"adversarial{j}"] = Collected()
        per_entry[f"adv_pred{j}"] = Collected()
    return MetricCollection(clean=Collected(), clean_pred=Collected(), **per_entry)


def accuracy_of(metrics: MetricCollection, name: str) -> Accuracy:
    """The member ``name`` that ``entry_metrics`` or ``run_metrics`` makes an ``Accuracy`` (a collection's
    members are typed as any ``Metric``)."""
    return cast(Accuracy, metrics.metrics[name])


def run_metrics() -> MetricCollection:
    """What a run counts over all samples. The names are the progress file's keys."""
    return MetricCollection(nonfinite=Scalar("sum"), clean=Accuracy(), index=Collected(), labels=Collected(),
                            pred=Collected(), robust_all=Collected())


@dataclass
class RunState:
    """Everything a run accumulates; ``entries[j]`` counts for the suite entry with index j."""

    totals: MetricCollection = field(default_factory=run_metrics)
    entries: list[MetricCollection] = field(default_factory=list)
    num_classes: int = -1  # learned from the first batch's logits
    sanity: dict = field(default_factory=dict)  # the first batch's checks (a resumed run does not see it again)
    data_digest: str = ""  # hash of the finished batches' data: a resume tells when it changed
    examples: MetricCollection | None = None  # kept adversarial examples (``example_metrics``); None: not asked
    # The segment under way: {"start": batches committed before it, "digest": the hash of the data through
    # it, "entries": per entry reached, its outcome (rows it finished, verdicts, ...): a record as a snapshot
    # holds it, or an object whose ``record()`` gives one}. Kept in snapshots so an interrupted run loses no
    # finished (entry, sample) pair; folded into the counts when the segment ends.
    partial: dict[str, Any] | None = None

    @classmethod
    def for_entries(cls, count: int, sanity: dict | None = None, keep_examples: bool = False,
                    minimum_norm: Collection[int] = ()) -> "RunState":
        """``minimum_norm``: the indices of the entries whose attacks measure minimal perturbations."""
        return cls(entries=[entry_metrics(j in minimum_norm) for j in range(count)], sanity=dict(sanity or {}),
                   examples=example_metrics(count) if keep_examples else None)

    # -- reading ---------------------------------------------------------------------------------------------
    @property
    def clean(self) -> Accuracy:
        return accuracy_of(self.totals, "clean")

    @property
    def n(self) -> int:
        return self.clean.total

    @property
    def nonfinite(self) -> int:
        return self.totals.nonfinite.compute()

    def per_sample(self, name: str) -> np.ndarray:
        """``index``, ``labels``, ``pred`` or ``robust_all`` as one array over the finished samples."""
        return self.totals.metrics[name].compute().numpy()

    def robust_all(self) -> np.ndarray | None:
        """Robust under every entry (None for a suite without entries)."""
        return self.per_sample("robust_all").astype(bool) if self.entries else None

    def segment_progress(self, start: int, digest: str, rows: int) -> list[dict[str, Any]]:
        """The saved entry outcomes of the segment starting after ``start`` batches ([] when none)."""
        partial = self.partial
        if partial is None or partial["start"] != start:
            return []
        if partial["digest"] != digest:
            raise UsageError("cannot resume: the data of the interrupted segment changed since the interrupted "
                             "run; start a new run with another --out")
        entries = partial["entries"]
        if len(entries) > len(self.entries) or any(len(e["done"]) != rows for e in entries):
            raise UsageError("cannot resume: the progress file does not match this run; start a new run with "
                             "another --out")
        return entries

    # -- combining -------------------------------------------------------------------------------------------
    def merge(self, other: "RunState") -> None:
        """Append ``other``'s samples (the next shard in rank order) and fold its counts in."""
        if len(other.entries) != len(self.entries):
            raise ValueError(f"cannot merge a run of {len(other.entries)} entries into one of {len(self.entries)}")
        self.totals.merge(other.totals)
        for mine, theirs in zip(self.entries, other.entries):
            mine.merge(theirs)
        self.num_classes = max(self.num_classes, other.num_classes)
        self.sanity = self.sanity or dict(other.sanity)  # the first batch's report: the first shard's
        if self.examples is not None and other.examples is not None:
            self.examples.merge(other.examples)
        # Hashes of two streams do not combine into the hash of the joined data: the whole set's
        # fingerprint is computed again from the data (``engine.dataset_fingerprint``).
        self.data_digest = ""

    def state_dict(self) -> dict[str, Any]:
        return {"totals": self.totals.state_dict(), "entries": [e.state_dict() for e in self.entries],
                "num_classes": self.num_classes, "sanity": dict(self.sanity), "data_digest": self.data_digest,
                **self._examples_part(lambda examples: examples.state_dict())}

    def _examples_part(self, saved) -> dict[str, Any]:
        # Only runs that keep examples carry the key: other runs' states and progress files are unchanged.
        return {} if self.examples is None else {"examples": saved(self.examples)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "RunState":
        measured = [j for j, saved in enumerate(state["entries"]) if "norms" in saved]
        run = cls.for_entries(len(state["entries"]), state["sanity"], keep_examples="examples" in state,
                              minimum_norm=measured)
        if run.examples is not None:
            run.examples.load_state_dict(state["examples"])
        run.totals.load_state_dict(state["totals"])
        for metrics, saved in zip(run.entries, state["entries"]):
            metrics.load_state_dict(saved)
        run.num_classes, run.data_digest = state["num_classes"], state["data_digest"]
        return run

    @classmethod
    def merged(cls, states: list[dict[str, Any]]) -> "RunState":
        """Gathered ``state_dict``s in rank order -> one state, as if one process had run the whole set."""
        run = cls.from_state_dict(states[0])
        for state in states[1:]:
            run.merge(cls.from_state_dict(state))
        return run

    # -- progress files --------------------------------------------------------------------------------------
    def snapshot(self, batches: int, batch_size: int) -> dict[str, Any]:
        """The finished batches as plain tensors and numbers (torch.save-able, weights_only)."""
        return {"format": PROGRESS_FORMAT, "batches": batches, "batch_size": batch_size,
                "num_classes": self.num_classes, **self.totals.state_values(), "sanity": dict(self.sanity),
                "data_digest": self.data_digest, "entries": [e.state_values() for e in self.entries],
                **self._examples_part(lambda examples: examples.state_values()),
                **({} if self.partial is None else {"partial": _partial_record(self.partial)})}

    def restore(self, snapshot: dict[str, Any], batch_size: int) -> int:
        """Load a snapshot taken with the same suite and batch size; returns the batches it holds."""
        check_format(snapshot)
        _check_float_examples(snapshot)
        if snapshot["batch_size"] != batch_size:
            raise UsageError(f"cannot resume: the run used --batch-size {snapshot['batch_size']}, not {batch_size}")
        if len(snapshot["entries"]) != len(self.entries):
            raise UsageError("cannot resume: the suite has changed since the interrupted run")
        self.totals.load_state_values({name: snapshot[name] for name in self.totals.metrics})
        for metrics, saved in zip(self.entries, snapshot["entries"]):
            metrics.load_state_values(saved)
        if self.examples is not None:
            if "examples" not in snapshot:
                raise UsageError("cannot resume: the interrupted run did not save adversarial examples; "
                                 "start a new run with --save-adversarial and another --out")
            self.examples.load_state_values(snapshot["examples"])
        self.num_classes, self.data_digest = snapshot["num_classes"], snapshot["data_digest"]
        self.sanity.update(snapshot["sanity"])
        self.partial = _checked_partial(snapshot.get("partial"), snapshot["batches"])
        return snapshot["batches"]


@dataclass
class RunOutcome:
    """A finished (or interrupted) run: its state, the entries it ran and the run-level facts."""

    state: RunState
    entries: list[Entry]  # configuration; the counts are ``state.entries``
    fingerprint: str
    seconds: float
    complete: bool = True
    total: int = 0  # samples in the dataset (state.n counts the evaluated ones)
    speed: dict = field(default_factory=dict)
    batch_size: int = 0  # the batch size used (resolved when asked for "auto")

    def with_entries(self) -> list[tuple[Entry, MetricCollection]]:
        return list(zip(self.entries, self.state.entries))


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM during a run: ``outcome`` holds the finished batches (complete=False)."""

    def __init__(self, outcome: RunOutcome) -> None:
        super().__init__("the run was interrupted")
        self.outcome = outcome


def _check_float_examples(snapshot: dict) -> None:
    """Kept examples are float since the files carry the scored images; an earlier robench kept them as
    8-bit images in the same format, and mixing the two would save a wrong npz."""
    clean = (snapshot.get("examples") or {}).get("clean")
    tensors = clean if isinstance(clean, (list, tuple)) else [clean]
    if any(isinstance(t, torch.Tensor) and not t.is_floating_point() for t in tensors):
        raise UsageError("cannot resume: the progress file was written by an older robench that kept 8-bit "
                         "examples; start a new run with another --out")


def _partial_record(partial: dict[str, Any]) -> dict[str, Any]:
    return {**partial, "entries": [e if isinstance(e, dict) else e.record() for e in partial["entries"]]}


PARTIAL_RECORD = {"done", "robust", "seconds", "gradient_evals", "peak_memory", "found_by", "examples"}
OPTIONAL_RECORD = {"norms"}  # minimum-norm entries only: the records of other entries are as they always were


def _checked_partial(partial: Any, batches: int) -> dict[str, Any] | None:
    """The segment under way as a snapshot keeps it, its layout checked (None: there was none)."""
    if partial is None:
        return None
    try:
        ok = (partial["start"] == batches and isinstance(partial["digest"], str)
              and all(set(e) - OPTIONAL_RECORD == PARTIAL_RECORD and e["done"].dtype == torch.bool
                      and e["robust"].shape == e["done"].shape for e in partial["entries"]))
    except (KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise UsageError("cannot resume: the progress file's record of the interrupted segment is damaged; start "
                         "a new run with another --out")
    return partial


def check_format(state: dict) -> None:
    found = state.get("format") if isinstance(state, dict) else None
    if found in ("robench.progress/1", "robench.progress/2"):
        raise UsageError(f"cannot resume: the progress file was written by an older robench ({found}), which "
                         "recorded less about each run; start a new run with another --out")
    if found != PROGRESS_FORMAT:
        raise UsageError("cannot resume: the progress file is not robench's")
