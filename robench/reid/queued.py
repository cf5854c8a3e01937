"""Re-identification on the work queue (``robench.evaluation.work_queue``): under torchrun the clean
features and each setting's attacked groups are units that the processes claim; rank 0 puts the rows
together and every process receives them, so every process holds a single process's features.

A unit is a run of consecutive items (images to extract, or groups of images to attack) turned into the
feature rows of its images. Those rows do not depend on who computed them: an extraction unit is whole
batches of the single-process loader, a group is attacked as one batch, and an attack's random streams are
keyed by sample index.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from robench.errors import UsageError
from robench.evaluation import distributed
from robench.evaluation.work_queue import Plan, Queued, run_queue

__all__ = ["UNFIT_PROGRESS", "RowsJob", "RowsWork"]

UNFIT_PROGRESS = "cannot resume: the progress file's setting under way does not fit this run"

# Items a unit may hold: each posts its features through the store, so units stay small; ReID sets have
# few groups per setting, and plan_units makes units shorter still when there are few items per process.
LONGEST_UNIT = 8


@dataclass
class RowsJob:
    """A finished job, on every process: every row's features, the seconds of the busiest process, and
    the job's ``Queued.facts``."""

    features: torch.Tensor  # [total, D], CPU
    seconds: float
    facts: dict[str, Any]


class _Worker:
    def __init__(self, work: "RowsWork", batch_size: int) -> None:
        self.work, self.batch_size = work, batch_size

    def unit(self, start: int, stop: int) -> dict[str, Any]:
        features = self.work.compute(start, stop).detach().float().cpu()
        return {"rows": torch.tensor(self.work.rows_of(start, stop), dtype=torch.int64), "features": features}


class RowsWork:
    """``items`` items, planned in batches of ``batch_size`` (``work_queue.QueueWork``): ``rows_of(start,
    stop)`` are the rows (of ``total``) that items ``start:stop`` give, ``compute(start, stop)`` their
    features, one row each in that order. ``dim``, when known, is what a resumed unit's features must have."""

    def __init__(self, items: int, batch_size: int, rows_of: Callable[[int, int], list[int]],
                 compute: Callable[[int, int], torch.Tensor], total: int, dim: int | None = None) -> None:
        self.samples, self.rows_of, self.compute, self.total, self.dim = items, rows_of, compute, total, dim
        self.batch_size: int | None = batch_size

    def run(self, device: torch.device, resume_state: dict | None = None,
            save_state: Callable[[dict], None] | None = None, save_every: float = 2.0) -> RowsJob:
        """Every process computes the units it claims; all get the whole job (a collective: every process
        calls it). Ctrl-C or SIGTERM raise ``QueueInterrupted`` (rank 0 saved the units it had first)."""
        job = run_queue(self, device=device, resume_state=resume_state, save_state=save_state, save_every=save_every)
        # Processes run side by side: the job took as long as its busiest one.
        mine = None if job is None else RowsJob(self._assembled(job), job.seconds_per_process(), job.facts())
        whole = distributed.from_first(mine)
        assert whole is not None  # rank 0 always has the job
        return whole

    def longest(self, batch_size: int) -> int:
        return LONGEST_UNIT

    @contextlib.contextmanager
    def setup(self, batch_size: int | None) -> Iterator[_Worker]:
        if batch_size is None or batch_size != self.batch_size:  # a resumed plan cut otherwise: not this run's
            raise UsageError(UNFIT_PROGRESS)
        yield _Worker(self, batch_size)

    def check_saved(self, plan: Plan, unit: int, record: dict[str, Any]) -> None:
        """A progress file is input: a saved unit must hold exactly the rows its items give."""
        rows, features = record.get("rows"), record.get("features")
        want = torch.tensor(self.rows_of(*plan.bounds(unit)), dtype=torch.int64)
        fits = (isinstance(rows, torch.Tensor) and rows.dtype == torch.int64 and torch.equal(rows, want)
                and isinstance(features, torch.Tensor) and features.dtype == torch.float32
                and features.dim() == 2 and features.shape[0] == len(want)
                and (self.dim is None or features.shape[1] == self.dim))
        if not fits:
            raise UsageError(UNFIT_PROGRESS)

    def finished(self, record: dict[str, Any]) -> None:
        """ReID reports progress by stage, not by unit."""

    def check_collected(self, plan: Plan, unit: int, record: dict[str, Any]) -> None:
        """Nothing to check: units carry no digest of the images they read (every process must read the
        same data, as the classification queue checks)."""

    def _assembled(self, job: Queued) -> torch.Tensor:
        records = [record["unit"] for record in job.ordered()]
        features = torch.cat([record["features"] for record in records])
        out = torch.empty(self.total, features.shape[1], dtype=features.dtype)
        out[torch.cat([record["rows"] for record in records])] = features
        return out
