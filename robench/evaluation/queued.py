"""Classification on the work queue (``robench.evaluation.work_queue``): what ``engine.run`` is for one
process, ``run_queued`` is for the processes of a torchrun job, or one process resuming such a job.

A unit is attacked by ``PartRunner`` into a ``RunState`` of its own; rank 0 merges the units' states in
data order, so samples.csv and every count are a single process's.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterator

import torch

from robench.data.sources import ImageDataset
from robench.errors import RunError, UsageError
from robench.evaluation import distributed
from robench.evaluation.config import EngineConfig
from robench.evaluation.engine import PartRunner, dataset_fingerprint, part_fingerprints, segment_batches
from robench.evaluation.entries import build_entries
from robench.evaluation.state import RunInterrupted, RunOutcome, RunState
from robench.evaluation.work_queue import Plan, QueueInterrupted, Queued, is_queue_progress, run_queue
from robench.metrics import Scalar
from robench.models.wrapper import RobustModel
from robench.suites import Suite

__all__ = ["run_queued"]


def run_queued(model: RobustModel, dataset: ImageDataset, suite: Suite, options: EngineConfig = EngineConfig(), *,
               device: torch.device, resume_state: dict | None = None,
               save_state: Callable[[dict], None] | None = None, on_batch: Callable[[int], None] | None = None,
               progress: Any = None) -> RunOutcome:
    """``engine.run`` through the work queue. Rank 0 returns the whole run's outcome, the others an empty
    one (only rank 0 writes); ``save_state``, ``on_batch`` and ``progress`` are rank 0's and hear of every
    unit, whoever attacked it. Ctrl-C or SIGTERM raise ``RunInterrupted`` with the units collected (saved first).
    """
    started = time.perf_counter()
    work = _ClassificationWork(model, dataset, suite, options, device, on_batch, progress)
    if progress is not None and distributed.is_main_process():
        progress.start(len(dataset), _resumed_samples(resume_state))
    try:
        job = run_queue(work, device=device, resume_state=resume_state, save_state=save_state,
                        save_every=options.save_every)
    except QueueInterrupted as stop:
        raise RunInterrupted(work.outcome(stop.queued, started)) from stop
    return work.outcome(job, started)


def _resumed_samples(resume_state: dict | None) -> int:
    if not is_queue_progress(resume_state):
        return 0
    assert resume_state is not None
    plan = Plan(**resume_state["plan"])
    return sum(stop - start for start, stop in (plan.bounds(int(unit)) for unit in resume_state["units"]))


class _Worker:
    def __init__(self, runner: PartRunner) -> None:
        self.runner, self.batch_size = runner, runner.batch_size

    def unit(self, start: int, stop: int) -> dict[str, Any]:
        return {"state": self.runner.part(start, stop).state_dict()}


class _ClassificationWork:
    """The classification task's side of the queue (``work_queue.QueueWork``)."""

    def __init__(self, model: RobustModel, dataset: ImageDataset, suite: Suite, options: EngineConfig,
                 device: torch.device, on_batch: Callable[[int], None] | None, progress: Any) -> None:
        self.model, self.dataset, self.suite, self.options, self.device = model, dataset, suite, options, device
        self.on_batch, self.progress = on_batch, progress
        self.samples = len(dataset)
        self.batch_size = options.batch_size if isinstance(options.batch_size, int) else None
        self.runner: PartRunner | None = None
        self.fingerprints: tuple[str, list[str]] | None = None  # see ``_fingerprints``

    def longest(self, batch_size: int) -> int:
        # A unit is attacked as one engine segment; without refill nothing gains from longer ones.
        return segment_batches(batch_size, self.dataset) if self.options.refill else 1

    @contextlib.contextmanager
    def setup(self, batch_size: int | None) -> Iterator[_Worker]:
        with PartRunner(self.model, self.dataset, self.suite, self.options, device=self.device,
                        batch_size=batch_size) as runner:
            self.runner = runner
            yield _Worker(runner)

    def check_saved(self, plan: Plan, unit: int, record: dict[str, Any]) -> None:
        start, stop = plan.bounds(unit)
        piece = ImageDataset(self.dataset.base, self.dataset.name, self.dataset.indices[start:stop])
        if dataset_fingerprint(piece, plan.batch_size) != record["state"]["data_digest"]:
            raise UsageError(f"cannot resume {self.dataset.name}: the data changed since the interrupted run "
                             f"(samples {start} to {stop - 1} differ); start a new run with another --out")

    def finished(self, record: dict[str, Any]) -> None:
        state = record["state"]
        samples = int(state["totals"]["clean"]["total"])
        if self.progress is not None:
            for entry in range(-1, len(state["entries"])):
                self.progress.entry_done(entry, samples)
        if self.on_batch is not None:
            self.on_batch(samples)

    def check_collected(self, plan: Plan, unit: int, record: dict[str, Any]) -> None:
        """Each unit against rank 0's own read of its samples: a node that read other data (another copy of
        the data set, another preprocessing) stops the job instead of giving a wrong number."""
        if record["unit"]["state"]["data_digest"] != self._fingerprints(plan)[1][unit]:
            start, stop = plan.bounds(unit)
            raise RunError(f"{record['worker']} read other data than the first process for samples {start} to "
                           f"{stop - 1} of {self.dataset.name}; every node needs the same data and options: run "
                           "the same command again once they agree (the units already checked are kept)")

    def _fingerprints(self, plan: Plan) -> tuple[str, list[str]]:
        """The whole set's fingerprint and each unit's, from one read of the data (rank 0, once)."""
        if self.fingerprints is None:
            self.fingerprints = part_fingerprints(self.dataset, plan.batch_size, plan.unit_batches)
        return self.fingerprints

    def outcome(self, job: Queued | None, started: float) -> RunOutcome:
        """Rank 0: the units merged in data order (the whole run once complete); other ranks: an empty outcome."""
        entries = self.runner.entries if self.runner else build_entries(self.suite, self.model, self.options.seed)
        seconds = time.perf_counter() - started
        if job is None:
            return RunOutcome(RunState.for_entries(len(entries)), entries, "", seconds, complete=False,
                              total=self.samples)
        records = job.ordered()
        state = RunState.merged([r["unit"]["state"] for r in records]) if records else \
            RunState.for_entries(len(entries))
        _wall_time_per_entry(state, job)
        fingerprint = self._fingerprints(job.plan)[0] if job.complete else ""
        outcome = RunOutcome(state, entries, fingerprint, seconds, complete=job.complete, total=self.samples,
                             batch_size=job.plan.batch_size)
        speed = self.runner.speed_facts() if self.runner else {}
        outcome.speed = {**speed, "work_units": job.facts()}
        return outcome


def _wall_time_per_entry(state: RunState, job: Queued) -> None:
    """An entry's seconds: each process adds up its own units; processes run side by side."""
    for j, counts in enumerate(state.entries):
        seconds = job.seconds_per_process(lambda unit: unit["state"]["entries"][j]["seconds"]["value"])
        scalar = counts.metrics["seconds"]
        assert isinstance(scalar, Scalar)  # entry_metrics declares it so
        scalar.value = seconds
