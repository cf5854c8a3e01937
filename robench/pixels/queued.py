"""The pixel experiments on the work queue (``robench.evaluation.work_queue``): what
``run_pixel_experiments`` is for one process, ``PixelWork.run`` is for the processes of a torchrun job,
or for one process resuming such a job.

A unit is a run of ``run_pixel_experiments`` on its images; the draws are keyed by folder position, so
its counts do not depend on which process computed it. Rank 0 adds the units' counts up in folder order:
every total is a single process's.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from robench.errors import RunError, UsageError
from robench.evaluation.work_queue import Plan, QueueInterrupted, Queued, run_queue
from robench.models.wrapper import RobustModel
from robench.pixels.experiment import PixelCounts, PixelExperimentsInterrupted, data_digest, images_fingerprint, \
    run_pixel_experiments

__all__ = ["PixelWork"]

# A unit's images go through every experiment batch by batch, with nothing that gains from long units:
# short ones keep the tail of a job short (``plan_units`` makes them shorter still for small folders).
LONGEST_UNIT = 8


class _Worker:
    def __init__(self, work: "PixelWork") -> None:
        self.work, self.batch_size = work, work.options["batch_size"]

    def unit(self, start: int, stop: int) -> dict[str, Any]:
        work = self.work
        labels = None if work.labels is None else work.labels[start:stop]
        counts = run_pixel_experiments(work.model, work.images[start:stop], labels, **work.options, first=start)
        return counts.snapshot(self.batch_size)


class PixelWork:
    """The Pixel-index task's side of the queue (``work_queue.QueueWork``).

    ``options`` are ``run_pixel_experiments``'s experiment options (pixels, settings, trials, seed,
    shared_positions, channels, attack_eps, batch_size, device); ``on_batch`` hears, on rank 0, of the
    images of every unit, whoever computed it.
    """

    def __init__(self, model: RobustModel, images: torch.Tensor, labels: torch.Tensor | None,
                 options: dict[str, Any], on_batch: Callable[[int], None] | None = None) -> None:
        self.model, self.images, self.labels, self.on_batch = model, images, labels, on_batch
        self.options = options
        self.samples = len(images)
        self.batch_size: int | None = options["batch_size"]  # always given: pixel-index has no --batch-size auto
        self.work_units: dict[str, Any] | None = None  # results.json's env.speed.work_units, once run (rank 0)

    def run(self, resume_state: dict | None = None, save_state: Callable[[dict], None] | None = None,
            save_every: float = 2.0) -> PixelCounts | None:
        """Rank 0: the counts of every image; the others: None (only rank 0 writes). Ctrl-C or SIGTERM
        raise ``PixelExperimentsInterrupted`` with the units collected (rank 0; empty counts elsewhere)."""
        try:
            job = run_queue(self, device=self.options["device"], resume_state=resume_state, save_state=save_state,
                            save_every=save_every)
        except QueueInterrupted as stop:
            raise PixelExperimentsInterrupted(self._counts(stop.queued)) from stop
        return None if job is None else self._counts(job)

    def longest(self, batch_size: int) -> int:
        return LONGEST_UNIT

    @contextlib.contextmanager
    def setup(self, batch_size: int | None) -> Iterator[_Worker]:
        # The plan's batch size: the one asked, unless a resumed job's plan keeps another. Refused then, as a
        # single-process resume refuses it; here, inside the queue, every process hears of it.
        if batch_size != self.batch_size:
            raise UsageError(f"cannot resume: the run used --batch-size {batch_size}, not {self.batch_size}")
        self.model.to(self.options["device"])
        yield _Worker(self)

    def check_saved(self, plan: Plan, unit: int, record: dict[str, Any]) -> None:
        start, stop = plan.bounds(unit)
        saved = PixelCounts.restored(record, plan.batch_size)  # refuses what is not a unit's counts
        if self._digest(plan, start, stop) != saved.data_digest:
            raise UsageError(f"cannot resume: the images changed since the interrupted run (images {start} to "
                             f"{stop - 1} differ); start a new run with another --out")

    def check_collected(self, plan: Plan, unit: int, record: dict[str, Any]) -> None:
        """Each unit's digest against rank 0's own images: a node that read another folder (or read it
        otherwise) stops the job instead of giving a wrong Pixel-index."""
        start, stop = plan.bounds(unit)
        if self._digest(plan, start, stop) != PixelCounts.restored(record["unit"], plan.batch_size).data_digest:
            raise RunError(f"{record['worker']} read other images than the first process (images {start} to "
                           f"{stop - 1}); every node needs the same folder and options: run the same command "
                           "again once they agree (the units already checked are kept)")

    def _digest(self, plan: Plan, start: int, stop: int) -> str:
        labels = None if self.labels is None else self.labels[start:stop]
        return data_digest(self.images[start:stop], labels, plan.batch_size)

    def finished(self, record: dict[str, Any]) -> None:
        if self.on_batch is not None:
            self.on_batch(int(record["clean_total"]))

    def _counts(self, job: Queued | None) -> PixelCounts:
        """The units added up in folder order; the fingerprint only once every image is in."""
        if job is None:
            return PixelCounts()
        counts = PixelCounts()
        for record in job.ordered():
            counts = counts.plus(PixelCounts.restored(record["unit"], job.plan.batch_size))
        # Processes run side by side: the job took as long as its busiest one.
        counts.seconds = job.seconds_per_process()
        counts.fingerprint = images_fingerprint(self.images, job.plan.batch_size) if job.complete else ""
        self.work_units = job.facts()
        return counts
