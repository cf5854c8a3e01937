"""A shared work queue: the processes of a ``torchrun`` job (one node or several) claim units of the data
until none is left, so a process that finishes early takes more.

Robust-accuracy work is uneven (a fooled sample costs a few steps, a robust one every attack in full)
and data sets are often ordered by class, so fixed shards leave a job waiting for its slowest one.
Here every process claims the next unit with one atomic counter on the group's store, computes it and
posts its record back to the store; rank 0 collects the units as they arrive, keeps the progress file
(the same writer and run key as a single-process run) and hands the task every record at the end,
which merges them in data order. Tasks key randomness by sample index, so the result equals a single
process's for any number of processes and any claim order.

The cut into units is fixed when a job first starts and kept in the progress file: a job resumed after
a failure (``torchrun --max-restarts``, or the same command again) computes only the units not saved,
with any number of processes, a single one included.

A task takes part through ``QueueWork`` (classification: ``robench.evaluation.queued``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ContextManager, Iterator, Protocol

import torch
import torch.distributed as dist

from robench.errors import RunError, UsageError
from robench.evaluation import distributed

__all__ = ["Plan", "QueueInterrupted", "QueueWork", "Queued", "finished_units_text", "is_queue_progress",
           "plan_units", "run_queue"]

QUEUE_FORMAT = "robench.units/1"
# Units per process on average when a job starts: enough that the last unit to finish is a short tail,
# few enough that each unit is a long queue for the attacks' refilled pools (a unit's pool drains at its
# end: at 16 units a process, units of one batch cost the uneven bench a tenth more time than at 4).
UNITS_PER_PROCESS = 4
POLL_SECONDS = 0.05


@dataclass(frozen=True)
class Plan:
    """How the data is cut: units of ``unit_batches`` batches of ``batch_size`` samples (the last one shorter)."""

    batch_size: int
    unit_batches: int
    samples: int

    @property
    def unit_samples(self) -> int:
        return self.batch_size * self.unit_batches

    @property
    def count(self) -> int:
        return -(-self.samples // self.unit_samples)

    def bounds(self, unit: int) -> tuple[int, int]:
        return unit * self.unit_samples, min(self.samples, (unit + 1) * self.unit_samples)


def plan_units(samples: int, batch_size: int, longest: int, processes: int) -> Plan:
    """Units of whole batches, at most ``longest`` and about UNITS_PER_PROCESS per process."""
    batches = -(-samples // batch_size)
    return Plan(batch_size, max(1, min(longest, batches // (UNITS_PER_PROCESS * processes))), samples)


def is_queue_progress(state: dict[str, Any] | None) -> bool:
    """A progress file written by a work-queue job (``run_queue``) rather than by a single process."""
    return isinstance(state, dict) and state.get("format") == QUEUE_FORMAT


def finished_units_text(state: dict[str, Any]) -> str:
    """What a queued job's progress file holds, as the "resuming ..." line says it."""
    return f"{len(state['units'])} of {Plan(**state['plan']).count} finished work units"


class QueueWorker(Protocol):
    """A process set up for the work (model on its device, ...): what it computes a unit with."""

    batch_size: int  # as resolved (a probed --batch-size auto)

    def unit(self, start: int, stop: int) -> dict[str, Any]:
        """Samples ``start:stop``: a record of plain tensors and numbers (``torch.save``-able, weights_only)."""
        ...


class QueueWork(Protocol):
    """One task's side of a queued job."""

    samples: int  # in the whole data
    batch_size: int | None  # as asked; None: probed by ``setup`` (--batch-size auto)

    def setup(self, batch_size: int | None) -> ContextManager[QueueWorker]:
        """This process ready to compute units, in batches of ``batch_size`` (None: probe it)."""
        ...

    def longest(self, batch_size: int) -> int:
        """The most batches a unit may hold."""
        ...

    def check_saved(self, plan: Plan, unit: int, record: dict[str, Any]) -> None:
        """Rank 0, resuming: raise ``UsageError`` when the data of a saved unit changed."""
        ...

    def finished(self, record: dict[str, Any]) -> None:
        """Rank 0: a unit arrived (from any process): report progress."""
        ...

    def check_collected(self, plan: Plan, unit: int, record: dict[str, Any]) -> None:
        """Rank 0, as each unit arrives (from any process): raise to stop every process (a unit computed
        from other data than rank 0 reads, say). Checked on arrival rather than at the end, so a node with
        the wrong data costs the job one unit rather than all of them."""
        ...


@dataclass
class Queued:
    """Rank 0's view of a job: the plan, every collected unit by number (resumed ones included), in records
    ``{"unit": the task's record, "seconds": ..., "worker": host:pid}``."""

    plan: Plan
    units: dict[int, dict[str, Any]] = field(default_factory=dict)
    resumed: int = 0
    complete: bool = False

    def ordered(self) -> list[dict[str, Any]]:
        return [self.units[unit] for unit in sorted(self.units)]

    def facts(self) -> dict[str, Any]:
        """results.json's ``speed.work_units``."""
        return {"units": self.plan.count, "unit_batches": self.plan.unit_batches, "resumed": self.resumed,
                "processes": distributed.world()[1]}

    def seconds_per_process(self, seconds_of: Callable[[dict[str, Any]], float] | None = None) -> float:
        """The time of the slowest process: each adds up its own units (``seconds_of`` a part of a unit from
        the task's record; by default the time the unit took)."""
        per_worker: dict[str, float] = {}
        for record in self.units.values():
            seconds = record["seconds"] if seconds_of is None else seconds_of(record["unit"])
            per_worker[record["worker"]] = per_worker.get(record["worker"], 0.0) + seconds
        return max(per_worker.values(), default=0.0)


class QueueInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during a queued job: ``queued`` holds the units collected (rank 0; saved first)."""

    def __init__(self, queued: Queued | None) -> None:
        super().__init__("interrupted")
        self.queued = queued


def run_queue(work: QueueWork, *, device: torch.device, resume_state: dict | None = None,
              save_state: Callable[[dict], None] | None = None, save_every: float = 2.0) -> Queued | None:
    """Every process of a torchrun job (or one process resuming such a job) computes the units it claims;
    rank 0 returns what was collected, the others None."""
    processes = distributed.world()[1]
    joined = distributed.process_group(device) if processes > 1 else contextlib.nullcontext(None)
    with joined as group:
        queue: _Queue = _StoreQueue(group) if group is not None else _LocalQueue()
        if not queue.leads:
            _follow(queue, work)
            return None
        try:
            return _Lead(queue, work, _saved_units(resume_state, work), save_state, save_every).run(processes)
        except BaseException:
            queue.abort()
            raise


# -- the queue ---------------------------------------------------------------------------------------------------

class _Queue:
    """Claims, posted units and the plan, between the processes of a job (``_StoreQueue``) or within one."""

    leads: bool = True

    def share(self, plan: Plan, pending: list[int]) -> None: ...

    def plan(self) -> tuple[Plan, list[int]]:
        raise NotImplementedError

    def claims(self, pending: list[int]) -> Iterator[int]:
        raise NotImplementedError

    def post(self, unit: int, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def collect(self) -> list[tuple[int, dict[str, Any]]]:
        """Units posted since the last call (rank 0)."""
        raise NotImplementedError

    def finish(self) -> None: ...

    def abort(self) -> None:
        """Rank 0 stopped (an error, an interruption): the others stop waiting for it."""

    def wait_finished(self) -> None: ...


class _LocalQueue(_Queue):
    """One process resuming a queued job: it claims every unit itself."""

    def __init__(self) -> None:
        self.posted: list[tuple[int, dict[str, Any]]] = []

    def claims(self, pending: list[int]) -> Iterator[int]:
        yield from pending

    def post(self, unit: int, record: dict[str, Any]) -> None:
        self.posted.append((unit, record))

    def collect(self) -> list[tuple[int, dict[str, Any]]]:
        found, self.posted = self.posted, []
        return found


class _StoreQueue(_Queue):
    """The group's store: an atomic claim counter, and a log of posted units that rank 0 reads in order."""

    def __init__(self, group: distributed.Group) -> None:
        self.store, self.leads = group.store, group.rank == 0
        self.read = 0  # posts collected so far (rank 0)

    def share(self, plan: Plan, pending: list[int]) -> None:
        self.store.set("plan", json.dumps({"plan": asdict(plan), "pending": pending}))

    def plan(self) -> tuple[Plan, list[int]]:
        _wait_for(self.store, "plan")  # rank 0 may first resolve --batch-size auto
        shared = json.loads(self.store.get("plan"))
        return Plan(**shared["plan"]), shared["pending"]

    def claims(self, pending: list[int]) -> Iterator[int]:
        while (slot := self.store.add("claimed", 1) - 1) < len(pending):
            _raise_if_aborted(self.store)
            yield pending[slot]

    def post(self, unit: int, record: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(record, buffer)
        self.store.set(f"unit/{unit}", buffer.getvalue())  # type: ignore[arg-type]  # the binding takes bytes too
        # The log entry comes after the unit, so a reader who finds it finds the unit.
        self.store.set(f"posted/{self.store.add('posts', 1) - 1}", str(unit))

    def collect(self) -> list[tuple[int, dict[str, Any]]]:
        found = []
        while self.store.check([f"posted/{self.read}"]):
            unit = int(self.store.get(f"posted/{self.read}"))
            record = torch.load(io.BytesIO(self.store.get(f"unit/{unit}")), map_location="cpu", weights_only=True)
            self.store.delete_key(f"unit/{unit}")  # the store holds each unit only until rank 0 has it
            found.append((unit, record))
            self.read += 1
        return found

    def finish(self) -> None:
        self.store.set("finished", "1")

    def abort(self) -> None:
        self.store.set("aborted", "1")

    def wait_finished(self) -> None:
        _wait_for(self.store, "finished")


def _wait_for(store: dist.Store, key: str) -> None:
    """Until rank 0 sets ``key``. Polled rather than a blocking get: rank 0's wait may outlast the store's
    timeout. If rank 0 stops with an error, it says so here (torchrun stops the processes of its own node,
    not always those of the others)."""
    while not store.check([key]):
        _raise_if_aborted(store)
        time.sleep(POLL_SECONDS)


def _raise_if_aborted(store: dist.Store) -> None:
    if store.check(["aborted"]):
        raise RunError("the first process (rank 0) stopped; its output says why")


# -- the processes -----------------------------------------------------------------------------------------------

def _compute_claims(worker: QueueWorker, queue: _Queue, plan: Plan, pending: list[int],
                    before_each: Callable[[], None] = lambda: None) -> None:
    name = f"{socket.gethostname()}:{os.getpid()}"
    for unit in queue.claims(pending):
        before_each()
        start = time.perf_counter()
        record = worker.unit(*plan.bounds(unit))
        queue.post(unit, {"unit": record, "seconds": time.perf_counter() - start, "worker": name})


def _follow(queue: _Queue, work: QueueWork) -> None:
    """A process other than rank 0: claim units until none is left, then wait for the job to end."""
    plan, pending = queue.plan()
    try:
        with work.setup(plan.batch_size) as worker:
            _compute_claims(worker, queue, plan, pending)
        queue.wait_finished()
    except KeyboardInterrupt as exc:
        raise QueueInterrupted(None) from exc
    except dist.DistNetworkError as exc:
        # Rank 0's node hosts the store: once it has stopped, the connection breaks before "aborted" is read.
        raise RunError(f"the first process (rank 0) stopped; its output says why ({type(exc).__name__})") from exc


def _saved_units(resume_state: dict | None, work: QueueWork) -> Queued | None:
    if resume_state is None:
        return None
    if not is_queue_progress(resume_state):
        raise UsageError("cannot resume under torchrun: the run was started by a single process; resume it "
                         "with a single process (without torchrun)")
    try:
        plan = Plan(**resume_state["plan"])
        saved = Queued(plan, {int(k): v for k, v in resume_state["units"].items()})
    except (KeyError, TypeError, ValueError):
        raise UsageError("cannot resume: the progress file's units are damaged; start a new run with another "
                         "--out") from None
    fitting = all(0 <= k < plan.count and _is_record(record) for k, record in saved.units.items())
    if plan.samples != work.samples or not fitting:
        raise UsageError("cannot resume: the progress file does not match this run; start a new run with "
                         "another --out")
    for unit, record in saved.units.items():
        work.check_saved(plan, unit, record["unit"])
    saved.resumed = len(saved.units)
    return saved


def _is_record(record: Any) -> bool:
    """The queue's own fields of a saved unit (the task checks the rest)."""
    return (isinstance(record, dict) and isinstance(record.get("unit"), dict) and isinstance(record.get("worker"), str)
            and isinstance(record.get("seconds"), float) and record["seconds"] >= 0)


class _Lead:
    """Rank 0: a worker like the others, and the collector of every unit (its own included)."""

    def __init__(self, queue: _Queue, work: QueueWork, saved: Queued | None,
                 save_state: Callable[[dict], None] | None, save_every: float) -> None:
        self.queue, self.work, self.save_state, self.save_every = queue, work, save_state, save_every
        self.saved = saved
        self.job: Queued | None = None
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.failure: BaseException | None = None
        self.last_save = time.perf_counter()

    def run(self, processes: int) -> Queued:
        known = self.saved.plan.batch_size if self.saved else self.work.batch_size
        # The others start as soon as the plan is shared: before rank 0 sets up (compiles), unless it must
        # first probe --batch-size auto.
        pending = self._share(self._plan(known, processes)) if known is not None else []
        with self.work.setup(known) as worker:
            if self.job is None:
                pending = self._share(self._plan(worker.batch_size, processes))
            job = self.job
            assert job is not None  # set by _share
            collector = threading.Thread(target=self._collect_until_stopped, name="robench-collector", daemon=True)
            collector.start()
            try:
                _compute_claims(worker, self.queue, job.plan, pending, self._raise_failure)
                self._wait_for_all()
            except BaseException as exc:
                self._stop(collector)
                if isinstance(exc, KeyboardInterrupt):
                    raise QueueInterrupted(job) from exc
                raise
            self._stop(collector)
            job.complete = True
        self.queue.finish()
        return job

    def _plan(self, batch_size: int, processes: int) -> Plan:
        if self.saved is not None:
            return self.saved.plan
        return plan_units(self.work.samples, batch_size, self.work.longest(batch_size), processes)

    def _share(self, plan: Plan) -> list[int]:
        """Give every process the plan and the units still to compute."""
        self.job = Queued(plan, dict(self.saved.units), self.saved.resumed) if self.saved else Queued(plan)
        pending = [unit for unit in range(plan.count) if unit not in self.job.units]
        self.queue.share(plan, pending)
        return pending

    def _collect_until_stopped(self) -> None:
        try:
            while not self.stop.wait(POLL_SECONDS):
                self._collect(final=False)
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, which raises it
            self.failure = exc

    def _collect(self, final: bool) -> None:
        assert self.job is not None
        found, refused = self._checked(self.queue.collect())
        with self.lock:
            for unit, record in found:
                self.job.units[unit] = record
        for _, record in found:
            self.work.finished(record["unit"])
        due = time.perf_counter() - self.last_save >= self.save_every
        if self.save_state is not None and (final or refused or (found and due)):
            self.save_state(self._snapshot())  # the units that passed are kept for a rerun
            self.last_save = time.perf_counter()
        if refused is not None:
            self.failure = self.failure or refused  # the first refusal is the one reported
            raise self.failure

    def _checked(self, found: list[tuple[int, dict[str, Any]]]) -> tuple[list, Exception | None]:
        """The units that pass the task's check, and the first refusal."""
        assert self.job is not None
        passed, refused = [], None
        for unit, record in found:
            try:
                self.work.check_collected(self.job.plan, unit, record)
            except (RunError, UsageError) as exc:
                refused = refused or exc
                continue
            passed.append((unit, record))
        return passed, refused

    def _wait_for_all(self) -> None:
        assert self.job is not None
        while True:
            with self.lock:
                if len(self.job.units) == self.job.plan.count:
                    return
            self._raise_failure()
            time.sleep(POLL_SECONDS)

    def _raise_failure(self) -> None:
        """What stopped the collector (a unit of other data, a failed save), raised in the main thread."""
        if self.failure is not None:
            raise self.failure

    def _stop(self, collector: threading.Thread) -> None:
        self.stop.set()
        collector.join()
        self._collect(final=True)  # what arrived since, and the last snapshot
        self._raise_failure()

    def _snapshot(self) -> dict[str, Any]:
        assert self.job is not None
        with self.lock:
            units = {str(unit): record for unit, record in self.job.units.items()}
        return {"format": QUEUE_FORMAT, "plan": asdict(self.job.plan), "units": units}
