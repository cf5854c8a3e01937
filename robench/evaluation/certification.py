"""Certification by randomized smoothing over a data set, one sample after another: what ``robench certify``
computes, for one process (``run_certification``) or for the processes of a torchrun job (``CertifyWork``,
on the shared work queue of ``robench.evaluation.work_queue``).

A sample is finished once its noisy copies are all counted; its answers (``robench.evaluation.smoothing``)
depend only on the seed, its index and its pixels, so the finished samples of an interrupted run are kept
in the progress file and never computed again, and a resumed run ends with the answers of an
uninterrupted one. The progress file also holds a digest of the finished samples' data, compared before
any new sample is certified.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from robench.data.sources import ImageDataset
from robench.errors import RunError, UsageError
from robench.evaluation.engine import iterate_batches
from robench.evaluation.fingerprint import DataDigest
from robench.evaluation.sanity import check_output_shape, explain_failure
from robench.evaluation.smoothing import Smoothing, answer_from_counts, count_noisy_predictions
from robench.evaluation.work_queue import Plan, QueueInterrupted, Queued, run_queue
from robench.models.wrapper import evaluation_mode

__all__ = ["COLUMNS", "CertificationInterrupted", "CertifiedSamples", "CertifyWork", "run_certification"]

CERTIFY_PROGRESS_FORMAT = "robench.certify-progress/1"
# One row per sample: its place in the data, its label, the base model's clean prediction, then the smoothed
# classifier's answers (-1: abstained).
COLUMNS = ("index", "label", "base_prediction", "smoothed_prediction", "certified_class", "selected_count", "p_lower",
           "radius")
_FLOAT_COLUMNS = ("p_lower", "radius")
# Samples a work unit holds at most: a unit is n0 + n forward copies a sample, long enough already.
LONGEST_UNIT = 16


@dataclass
class CertifiedSamples:
    """The answers of the finished samples, in data order."""

    columns: dict[str, list] = field(default_factory=lambda: {name: [] for name in COLUMNS})
    data_digest: str = ""  # of the finished samples' data: a resume checks it
    fingerprint: str = ""  # of the whole data, once every sample is read (engine.dataset_fingerprint's value)
    seconds: float = 0.0
    classes: int = 0  # the model's output width; 0 before the first sample

    def __len__(self) -> int:
        return len(self.columns["index"])

    def append(self, row: dict[str, Any]) -> None:
        for name in COLUMNS:
            self.columns[name].append(row[name])
        self.classes = row["classes"]

    def plus(self, other: "CertifiedSamples") -> "CertifiedSamples":
        """These samples, then ``other``'s (a work unit's): the digests and times are the caller's to set."""
        return CertifiedSamples({name: self.columns[name] + other.columns[name] for name in COLUMNS},
                                classes=max(self.classes, other.classes))

    def snapshot(self) -> dict[str, Any]:
        """A progress-file state (plain tensors and strings: ``torch.load(weights_only=True)`` reads it)."""
        return {"format": CERTIFY_PROGRESS_FORMAT, "data_digest": self.data_digest, "seconds": self.seconds,
                "classes": self.classes,
                "columns": {name: torch.tensor(values, dtype=torch.float64 if name in _FLOAT_COLUMNS else torch.int64)
                            for name, values in self.columns.items()}}

    @classmethod
    def restored(cls, state: Any) -> "CertifiedSamples":
        """From a snapshot; a progress file that is not one is refused in one line."""
        try:
            if state["format"] != CERTIFY_PROGRESS_FORMAT:
                raise KeyError("format")
            columns = {name: state["columns"][name].tolist() for name in COLUMNS}
            if len({len(values) for values in columns.values()}) != 1:
                raise ValueError("columns of different lengths")
            return cls(columns, str(state["data_digest"]), seconds=float(state["seconds"]),
                       classes=int(state["classes"]))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise UsageError("cannot resume: the progress file does not hold a certification's finished samples; "
                             "start a new run with another --out") from None


class CertificationInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM: ``samples`` holds the finished samples (saved first, where a saver was given)."""

    def __init__(self, samples: CertifiedSamples) -> None:
        super().__init__("the certification was interrupted")
        self.samples = samples


def _data_changed(done: int) -> UsageError:
    return UsageError(f"cannot resume: the data changed since the interrupted run (its first {done} sample(s) "
                      "differ); start a new run with another --out")


class _Reader:
    """The data in order, a block at a time. The samples the interrupted run finished are read for the
    digest only, and checked against it once all of them are read; the others are digested as they
    finish (``certified_rows``), so the digest always covers exactly the finished samples."""

    def __init__(self, dataset: ImageDataset, block: int, done: int = 0, done_digest: str | None = None) -> None:
        self.dataset, self.block, self.done, self.done_digest = dataset, block, done, done_digest
        self.digest = DataDigest()
        self.read = 0

    def fresh_blocks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(x, y, index) of the samples still to certify, in blocks."""
        for x, y, index in iterate_batches(self.dataset, self.block, 0, False):
            y, index = torch.as_tensor(y), torch.as_tensor(index)
            finished = min(max(self.done - self.read, 0), len(x))
            self.read += len(x)
            if finished:
                self.digest.add(x[:finished], y[:finished], index[:finished])
                if self.read - len(x) + finished == self.done and self.digest.hexdigest() != self.done_digest:
                    raise _data_changed(self.done)
            if finished < len(x):
                yield x[finished:], y[finished:], index[finished:]
        if self.read < self.done:  # fewer samples than the interrupted run finished
            raise _data_changed(self.done)


def run_certification(model: nn.Module, dataset: ImageDataset, smoothing: Smoothing, *, batch_size: int,
                      device: torch.device, on_sample: Callable[[int], None] | None = None,
                      resume_state: dict[str, Any] | None = None,
                      save_state: Callable[[dict[str, Any]], None] | None = None,
                      save_every: float = 2.0) -> CertifiedSamples:
    """Every sample of ``dataset`` certified in order (``model`` takes [0, 1] images).

    ``save_state`` receives a snapshot after a sample at most every ``save_every`` seconds, after the
    last one and when the run stops; ``resume_state`` (such a snapshot) skips the samples it holds once
    their data is found unchanged. Ctrl-C raises ``CertificationInterrupted`` with the finished samples.
    """
    started = time.perf_counter()
    out = CertifiedSamples.restored(resume_state) if resume_state is not None else CertifiedSamples()
    done, earlier = len(out), out.seconds
    reader = _Reader(dataset, batch_size, done, out.data_digest if resume_state is not None else None)
    last_save = time.perf_counter()

    def snapshot() -> dict[str, Any]:
        out.seconds = earlier + time.perf_counter() - started
        return out.snapshot()

    model.to(device)
    with evaluation_mode(model), torch.no_grad():
        try:
            for row in certified_rows(model, reader, smoothing, batch_size, device):
                out.append(row)
                out.data_digest = reader.digest.hexdigest()
                if on_sample:
                    on_sample(1)
                if save_state and time.perf_counter() - last_save >= save_every:
                    save_state(snapshot())
                    last_save = time.perf_counter()
        except BaseException as exc:
            # Interrupted or failed: the finished samples stay for --resume.
            if save_state and len(out) > done:
                save_state(snapshot())
            if isinstance(exc, KeyboardInterrupt):
                out.seconds = earlier + time.perf_counter() - started
                raise CertificationInterrupted(out) from exc
            raise
    out.fingerprint = reader.digest.hexdigest()
    if save_state:
        save_state(snapshot())
    out.seconds = earlier + time.perf_counter() - started
    return out


def certified_rows(model: nn.Module, reader: _Reader, smoothing: Smoothing, batch_size: int,
                   device: torch.device) -> Iterator[dict[str, Any]]:
    """One row (``COLUMNS``) per sample still to certify, in order: the base model's clean prediction, then
    the smoothed classifier's answers. Each sample joins ``reader``'s digest as its row is made."""
    # The samples in the stream, oldest first: (x on the CPU, label, index, base prediction).
    waiting: deque[tuple[torch.Tensor, int, int, int]] = deque()

    def samples() -> Iterator[tuple[torch.Tensor, int]]:
        for x, y, index in reader.fresh_blocks():
            on_device = x.to(device)
            logits = _clean_logits(model, on_device)
            _check_labels(y, index, int(logits.shape[1]))
            base = logits.argmax(dim=1).tolist()
            for row in range(len(x)):
                waiting.append((x[row], int(y[row]), int(index[row]), int(base[row])))
                yield on_device[row], int(index[row])

    for selection, estimation in count_noisy_predictions(model, samples(), smoothing, batch_size):
        x, label, index, base = waiting.popleft()
        reader.digest.add(x.unsqueeze(0), torch.tensor([label]), torch.tensor([index]))
        answer = answer_from_counts(selection, estimation, smoothing)
        yield {"index": index, "label": label, "base_prediction": base, "smoothed_prediction": answer.predicted,
               "certified_class": answer.certified_class, "selected_count": answer.selected_count,
               "p_lower": answer.p_lower, "radius": answer.radius, "classes": len(selection)}


def _clean_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base model on a block of clean samples; a model that fails, or whose output is not one row of
    logits per image, is named in one line (``robench.evaluation.sanity``'s words, as for every task)."""
    try:
        logits = model(x)
    except Exception as exc:  # noqa: BLE001 - reported as the model's own failure, or what to fix
        raise explain_failure(model, x, exc) from exc
    check_output_shape(logits, len(x))
    return logits


def _check_labels(y: torch.Tensor, index: torch.Tensor, classes: int) -> None:
    outside = torch.nonzero((y < 0) | (y >= classes)).flatten()
    if len(outside):
        first = int(outside[0])
        raise UsageError(f"sample {int(index[first])} has label {int(y[first])}, outside the model's {classes} "
                         "classes")


# -- the work queue ----------------------------------------------------------------------------------------------

class _Worker:
    def __init__(self, work: "CertifyWork") -> None:
        self.work = work
        self.batch_size = 1  # the plan counts samples: a unit is a run of whole samples

    def unit(self, start: int, stop: int) -> dict[str, Any]:
        work = self.work
        piece = _piece(work.dataset, start, stop)
        reader = _Reader(piece, work.batch)
        samples = CertifiedSamples()
        for row in certified_rows(work.model, reader, work.smoothing, work.batch, work.device):
            samples.append(row)
        samples.data_digest = reader.digest.hexdigest()
        return samples.snapshot()


def _piece(dataset: ImageDataset, start: int, stop: int) -> ImageDataset:
    return ImageDataset(dataset.base, dataset.name, dataset.indices[start:stop])


def data_digest(dataset: ImageDataset, block: int) -> str:
    """The digest of every sample of ``dataset``: a unit's ``data_digest``, or the whole set's fingerprint."""
    digest = DataDigest()
    for x, y, index in iterate_batches(dataset, block, 0, False):
        digest.add(x, torch.as_tensor(y), torch.as_tensor(index))
    return digest.hexdigest()


class CertifyWork:
    """The certification's side of the queue (``work_queue.QueueWork``): units of whole samples; rank 0
    joins the units' rows in data order, so every answer is a single process's."""

    def __init__(self, model: nn.Module, dataset: ImageDataset, smoothing: Smoothing, batch: int,
                 device: torch.device, on_sample: Callable[[int], None] | None = None) -> None:
        self.model, self.dataset, self.smoothing, self.batch, self.device = model, dataset, smoothing, batch, device
        self.on_sample = on_sample
        self.samples = len(dataset)
        self.batch_size: int | None = 1  # of the plan: one sample (``batch`` is the copies per forward pass)
        self.work_units: dict[str, Any] | None = None  # results.json's env.speed.work_units, once run (rank 0)

    def run(self, resume_state: dict | None = None, save_state: Callable[[dict], None] | None = None,
            save_every: float = 2.0) -> CertifiedSamples | None:
        """Rank 0: every sample's answers; the others: None. Ctrl-C raises ``CertificationInterrupted``
        with the units collected (rank 0; nothing elsewhere)."""
        try:
            job = run_queue(self, device=self.device, resume_state=resume_state, save_state=save_state,
                            save_every=save_every)
        except QueueInterrupted as stop:
            raise CertificationInterrupted(self._joined(stop.queued)) from stop
        return None if job is None else self._joined(job)

    def longest(self, batch_size: int) -> int:
        return LONGEST_UNIT

    @contextlib.contextmanager
    def setup(self, batch_size: int | None) -> Iterator[_Worker]:
        self.model.to(self.device)
        with evaluation_mode(self.model), torch.no_grad():
            yield _Worker(self)

    def check_saved(self, plan: Plan, unit: int, record: dict[str, Any]) -> None:
        start, stop = plan.bounds(unit)
        saved = CertifiedSamples.restored(record)  # refuses what is not a unit's rows
        if len(saved) != stop - start or data_digest(_piece(self.dataset, start, stop), self.batch) != \
                saved.data_digest:
            raise UsageError(f"cannot resume: the data changed since the interrupted run (samples {start} to "
                             f"{stop - 1} differ); start a new run with another --out")

    def check_collected(self, plan: Plan, unit: int, record: dict[str, Any]) -> None:
        """A node that read other data than rank 0 stops the job rather than give wrong answers."""
        start, stop = plan.bounds(unit)
        if data_digest(_piece(self.dataset, start, stop), self.batch) != \
                CertifiedSamples.restored(record["unit"]).data_digest:
            raise RunError(f"{record['worker']} read other data than the first process (samples {start} to "
                           f"{stop - 1}); every node needs the same data and options: run the same command again "
                           "once they agree (the units already checked are kept)")

    def finished(self, record: dict[str, Any]) -> None:
        if self.on_sample is not None:
            self.on_sample(len(record["columns"]["index"]))

    def _joined(self, job: Queued | None) -> CertifiedSamples:
        """The units' rows in data order; the fingerprint once every sample is in."""
        if job is None:
            return CertifiedSamples()
        joined = CertifiedSamples()
        for record in job.ordered():
            joined = joined.plus(CertifiedSamples.restored(record["unit"]))
        joined.seconds = job.seconds_per_process()  # processes run side by side: the busiest one's time
        joined.fingerprint = data_digest(self.dataset, self.batch) if job.complete else ""
        self.work_units = job.facts()
        return joined
