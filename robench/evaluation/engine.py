"""The evaluation loop: one clean pass and every suite entry, batch by batch."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, cast

import numpy as np
import torch

from robench.attacks import AttackResult
from robench.attacks.base import AttackInterrupted
from robench.data.sources import ImageDataset, TensorImages, as_float
from robench.errors import RobenchError, RunError, UsageError
from robench.models.wrapper import RobustModel, evaluation_mode
from robench.evaluation.bpda import (BpdaHooks, distinct_settings, entry_hooks, every_gradient_entry_uses_bpda,
                                     hooks_during)
from robench.evaluation.config import EngineConfig
from robench.evaluation.fingerprint import DataDigest, batch_bytes
from robench.evaluation.precision import PrecisionModel, matmul_precision
from robench.evaluation.sanity import (bpda_checks, check_output_shape, explain_failure, first_batch_checks,
                                      worst_gradient_checks)
from robench.evaluation.speed import (AUTO_COMPILE_MIN_WORK, CPU_PROBE_IMAGES, SpeedReport, auto_batch_size,
                                     auto_cpu_threshold, cpu_auto_decision, estimated_queries, estimated_work, finish,
                                     measured_seconds_per_image, should_compile, speed_up, timed_first_call)
from robench.evaluation.entries import Entry, build_entries
from robench.evaluation.kept_examples import (as_float as from_8bit, quantize_adversarial, quantize_clean,
                                              samples_to_keep)
from robench.metrics import Scalar
from robench.evaluation.state import RunInterrupted, RunOutcome, RunState
from robench.suites import Suite
from robench.suites.schema import REID_FIELDS

__all__ = ["PartRunner", "check_labels", "dataset_fingerprint", "dataset_labels", "iterate_batches",
           "part_fingerprints", "run", "segment_batches"]


def iterate_batches(dataset: ImageDataset, batch_size: int, workers: int, pin: bool) -> Iterator:
    """In-memory data is sliced directly; other datasets go through a DataLoader."""
    if isinstance(dataset.base, TensorImages):
        base = dataset.base
        for start in range(0, len(dataset), batch_size):
            idx = torch.from_numpy(dataset.indices[start:start + batch_size])
            yield as_float(base.x[idx]), base.y[idx], idx
        return
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin
    )
    yield from loader


def dataset_labels(dataset: ImageDataset) -> np.ndarray | None:
    base = dataset.base
    labels = getattr(base, "y", None)
    if labels is None:
        labels = getattr(base, "targets", None)
    if labels is None:
        labels = getattr(base, "labels", None)
    if labels is None:
        return None
    return np.asarray(labels)[dataset.indices]


def check_labels(labels: np.ndarray, num_classes: int, indices: np.ndarray) -> None:
    bad = np.nonzero((labels < 0) | (labels >= num_classes))[0]
    if len(bad):
        first = int(bad[0])
        raise UsageError(
            f"label {int(labels[first])} of sample {int(indices[first])} is outside the model's "
            f"{num_classes} classes (0..{num_classes - 1}); {len(bad)} sample(s) affected"
        )


def run(
    model: RobustModel,
    dataset: ImageDataset,
    suite: Suite,
    options: EngineConfig = EngineConfig(),
    *,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
    progress: ProgressSink | None = None,
    resume_state: dict | None = None,
    save_state: Callable[[dict], None] | None = None,
) -> RunOutcome:
    """Evaluate every entry of ``suite``, batch by batch.

    ``on_batch(samples)`` is called when samples are committed; ``progress`` (a display) hears of
    the run's size at the start and of every entry's part of a segment as soon as it is done.
    ``save_state`` receives a snapshot at most every ``save_every`` seconds (checked after
    each entry), after the last batch and when the run is interrupted: the committed batches
    and, for the segment under way, every (entry, sample) pair finished so far (an attack
    interrupted by Ctrl-C reports the samples it had finished). ``resume_state`` (such a
    snapshot) skips what it holds. Randomness is keyed by sample index, so a resumed run
    equals an uninterrupted one.

    Batches are attacked a segment at a time (several batches, see ``segment_batches``):
    with ``refill``, an attack keeps ``batch_size`` samples in flight and refills the
    slots of fooled or finished samples from the rest of the segment.

    ``save_adversarial`` keeps the first N samples' examples as 8-bit images in the run state
    (0: every sample; None: none), see :mod:`robench.results.adversarial`. It changes no result.
    """
    _check_inputs(dataset, suite, options)
    started = time.perf_counter()
    model.to(device)
    entries = build_entries(suite, model, options.seed)
    was_training = any(m.training for m in model.model.modules())
    state = RunState.for_entries(len(entries), {"model_was_training": was_training},
                                 keep_examples=options.save_adversarial is not None,
                                 minimum_norm=_minimum_norm_entries(entries))
    with evaluation_mode(model), matmul_precision(options.precision):
        loop = _Loop(model, dataset, suite, options, entries, state, device, started)
        loop.prepare(progress, resume_state, was_training)
        try:
            loop.all_segments(on_batch, save_state)
        except BaseException as exc:
            loop.stopped(exc, save_state)
            raise
    return loop.finished_outcome(save_state)



class PartRunner:
    """The engine for a work queue: set up once, then parts of the data in any order, each attacked as one
    segment into a ``RunState`` of its own; what a process claims from the queue (``robench.evaluation.queue``).

    Results equal ``run``'s: randomness is keyed by sample index, so the parts' per-sample states,
    merged in data order, are the whole run's. The first batch's checks run on the part that starts
    the data; each process probes the model (the first call's time, the input gradient) on its first
    part. Use it as a context manager: the model stays in eval mode, at the asked precision, inside.
    """

    def __init__(self, model: RobustModel, dataset: ImageDataset, suite: Suite, options: EngineConfig = EngineConfig(),
                 *, device: torch.device, batch_size: int | None = None) -> None:
        _check_inputs(dataset, suite, options)
        model.to(device)
        self.entries = build_entries(suite, model, options.seed)
        self.was_training = any(m.training for m in model.model.modules())
        self._loop = _Loop(model, dataset, suite, options, self.entries, self._fresh_state(), device,
                           time.perf_counter())
        self._batch_size = batch_size
        self._stack = contextlib.ExitStack()
        self._probed = False

    def __enter__(self) -> "PartRunner":
        self._stack.enter_context(evaluation_mode(self._loop.model))
        self._stack.enter_context(matmul_precision(self._loop.options.precision))
        try:
            self._loop.prepare(None, None, self.was_training, self._batch_size)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def batch_size(self) -> int:
        return self._loop.batch_size

    @property
    def segment_batches(self) -> int:
        return self._loop.per_segment

    def part(self, start: int, stop: int) -> RunState:
        """Samples ``start:stop`` of the data, every entry; the state's ``data_digest`` is the part's."""
        loop = self._loop
        state = loop.state = self._fresh_state()
        piece = ImageDataset(loop.dataset.base, loop.dataset.name, loop.dataset.indices[start:stop])
        digests = DataDigest()
        batches = []
        for x, y, idx in iterate_batches(piece, loop.batch_size, loop.options.workers, loop.device.type == "cuda"):
            parts = batch_bytes(x, y, idx)
            digests.add_bytes(parts)
            batches.append((x, y, idx, parts))
        digest = digests.hexdigest()
        first = None
        if start == 0 or not self._probed:
            first = _FirstBatch(start == 0, None if self._probed else loop.speed)
        self._probed = True
        _run_segment(batches, loop.context, state, first, 0, digest)
        state.data_digest = digest
        return state

    def speed_facts(self) -> dict[str, Any]:
        return self._loop.speed_facts()

    def _fresh_state(self) -> RunState:
        return RunState.for_entries(len(self.entries), {"model_was_training": self.was_training},
                                    minimum_norm=_minimum_norm_entries(self.entries))


def _minimum_norm_entries(entries: list[Entry]) -> list[int]:
    """The entries whose attacks measure each sample's minimal perturbation (their states keep the norms)."""
    return [entry.index for entry in entries if entry.attack.minimum_norm]


def _check_inputs(dataset: ImageDataset, suite: Suite, options: EngineConfig) -> None:
    if len(dataset) == 0:
        raise UsageError("the dataset is empty")
    batch_size = options.batch_size
    if batch_size != "auto" and (not isinstance(batch_size, int) or batch_size < 1):
        raise UsageError(f"--batch-size must be a positive integer or auto, got {batch_size}")
    reid_only = [s.display_name() for s in suite.attacks
                 if any(getattr(s, f) is not None for f in REID_FIELDS)]
    if suite.task == "reid" or reid_only:
        raise UsageError(f"suite {suite.name} is for re-identification models "
                         f"({', '.join(reid_only) or 'task: reid'}); evaluate it on market1501:, dukemtmc: "
                         "or reid: data")


class _Loop:
    """One run's segments in order: what is committed (``finished`` batches), what a resume skipped
    (``done``), the data digest and the snapshots."""

    def __init__(self, model: RobustModel, dataset: ImageDataset, suite: Suite, options: EngineConfig,
                 entries: list[Entry], state: RunState, device: torch.device, started: float) -> None:
        self.model, self.dataset, self.suite, self.options = model, dataset, suite, options
        self.entries, self.state, self.device, self.started = entries, state, device, started
        # One stream per field, joined at the end: the fingerprint does not depend on batch size.
        self.digests = DataDigest()
        self.done = self.finished = 0  # batches: finished before a resume, committed by now
        self.last_save = time.perf_counter()
        self.resume_state: dict | None = None
        self.save_state: Callable[[dict], None] | None = None

    def prepare(self, progress: ProgressSink | None, resume_state: dict | None, was_training: bool,
                batch_size: int | None = None) -> None:
        """The forward pass (precision, compilation), the batch size, a resumed state, the attacks' hooks.

        ``batch_size`` overrides the options' (a work queue's processes share the one its plan fixed)."""
        options, device, dataset = self.options, self.device, self.dataset
        # Names are resolved first: a typo in a bpda list stops the run before any model pass.
        self.bpda = entry_hooks(self.suite, self.entries, self.model.model)
        # eval() on the outer wrapper too: torchattacks restores the mode it finds.
        precise = PrecisionModel(self.model, options.precision, device).eval()
        compiled, decision = self._compile_choice(precise)
        forward, self.speed = speed_up(precise, compile=compiled, backend=options.compile_backend,
                                       channels_last=options.channels_last)
        self.speed.decision = decision
        if batch_size is not None:
            self.batch_size = batch_size
        elif isinstance(options.batch_size, int):
            self.batch_size = options.batch_size
        else:  # "auto" (_check_inputs allows no other text); a resumed run keeps the batches it was cut into
            self.batch_size = resume_state["batch_size"] if resume_state else _auto_batch_size(
                forward, self.model, dataset, device)
        self.resume_state = resume_state
        if resume_state is not None:
            self.done = self.finished = self.state.restore(resume_state, self.batch_size)
            # The saved report describes the run's real first batch; keep it, as an uninterrupted run would.
            sanity = self.state.sanity
            sanity["model_was_training"] = bool(sanity.get("model_was_training")) or was_training
        if progress:
            progress.start(len(dataset), min(len(dataset), self.done * self.batch_size))
        self.context = _RunContext(forward, self.model, self.entries, device, dataset, dataset_labels(dataset),
                                   options.sweep_reuse, self.batch_size, options.refill, progress,
                                   options.save_adversarial, self.checkpoint, self.bpda,
                                   every_gradient_entry_uses_bpda(self.entries, self.bpda))
        for entry in self.entries:
            entry.attack.log = _attack_logger(entry, self.context)
            entry.attack.meter = _attack_meter(entry, self.context)
        # Without refill nothing gains from longer queues: a batch at a time, committed as it finishes.
        self.per_segment = segment_batches(self.batch_size, dataset) if options.refill else 1

    def _compile_choice(self, precise: torch.nn.Module) -> tuple[bool, str | None]:
        """Whether to compile, and for ``--compile auto`` why (on a CPU from a measured eager forward)."""
        options, device, dataset = self.options, self.device, self.dataset
        if self.bpda:
            return _eager_for_bpda(options.compile)
        work = estimated_work(len(dataset), self.suite)
        compiled = should_compile(options.compile, device, work)
        if options.compile != "auto":
            return compiled, None
        if device.type == "cuda":
            relation = ">=" if compiled else "<"
            return compiled, (f"auto: {'compiled' if compiled else 'eager'} ({work} gradient passes "
                              f"{relation} {AUTO_COMPILE_MIN_WORK})")
        if device.type != "cpu":
            return compiled, None
        eager, _ = speed_up(precise, compile=False, channels_last=options.channels_last)

        def seconds_per_image() -> float:
            probe = torch.stack([dataset[i][0] for i in range(min(len(dataset), CPU_PROBE_IMAGES))]).to(device)
            return measured_seconds_per_image(eager, probe.float())

        try:
            return cpu_auto_decision(estimated_queries(len(dataset), self.suite), seconds_per_image,
                                     auto_cpu_threshold(options.compile_backend))
        except Exception:  # noqa: BLE001 - the run's first batch reads and runs them again, and explains a failure
            return False, "auto: eager (the forward could not be timed)"

    def checkpoint(self) -> None:
        """A snapshot when one is due: the committed batches and the segment under way."""
        if self.save_state and time.perf_counter() - self.last_save >= self.options.save_every:
            self.save_state(self.state.snapshot(self.finished, self.batch_size))
            self.last_save = time.perf_counter()

    def all_segments(self, on_batch: Callable[[int], None] | None,
                     save_state: Callable[[dict], None] | None) -> None:
        self.save_state = save_state
        hashed, pending = 0, []  # pending: the batches of the segment being gathered, (x, y, idx, bytes)
        batches = iterate_batches(self.dataset, self.batch_size, self.options.workers, self.device.type == "cuda")
        for b, (x, y, idx) in enumerate(batches):
            parts = batch_bytes(x, y, idx)
            hashed = b + 1
            if b < self.done:
                # Finished before the interruption: only the fingerprint needs its data.
                self.digests.add_bytes(parts)
                if b + 1 == self.done:
                    assert self.resume_state is not None  # batches are done only after a resume
                    _check_same_data(self.resume_state, self.digests, self.done, self.dataset.name)
                continue
            pending.append((x, y, idx, parts))
            if len(pending) == self.per_segment:
                self.segment(pending, on_batch)
        if pending:
            self.segment(pending, on_batch)
        if hashed < self.done:  # fewer batches than the interrupted run finished
            raise _data_changed(self.dataset.name, self.done)

    def segment(self, pending: list[tuple], on_batch: Callable[[int], None] | None) -> None:
        first = _FirstBatch(self.resume_state is None, self.speed) if self.finished == self.done else None
        # The data through this segment: what its saved progress is resumed against. The state's own
        # digest (what a snapshot's committed batches are checked by) moves only once it is committed.
        for batch in pending:
            self.digests.add_bytes(batch[3])
        through = self.digests.hexdigest()
        _run_segment(pending, self.context, self.state, first, self.finished, through)
        self.state.data_digest = through
        self.finished += len(pending)
        if on_batch:
            on_batch(sum(len(b[1]) for b in pending))
        pending.clear()
        self.checkpoint()

    def stopped(self, exc: BaseException, save_state: Callable[[dict], None] | None) -> None:
        """Interrupted (Ctrl-C, SIGTERM) or failed: keep every finished batch, and what the segment under way
        finished, for --resume; an interruption becomes ``RunInterrupted`` with what finished."""
        state = self.state
        if save_state and (self.finished > self.done or state.partial is not None):
            save_state(state.snapshot(self.finished, self.batch_size))
        if isinstance(exc, KeyboardInterrupt):
            shown = _with_finished_rows(state, exc, self.context) if isinstance(exc, _SegmentInterrupted) else state
            raise RunInterrupted(self.outcome(False, "", shown)) from exc

    def outcome(self, complete: bool, fingerprint: str, shown: RunState | None = None) -> RunOutcome:
        return RunOutcome(shown or self.state, self.entries, fingerprint, time.perf_counter() - self.started,
                          complete=complete, total=len(self.dataset), batch_size=self.batch_size)

    def finished_outcome(self, save_state: Callable[[dict], None] | None) -> RunOutcome:
        if save_state:
            save_state(self.state.snapshot(self.finished, self.batch_size))
        result = self.outcome(True, self.digests.hexdigest())
        result.speed = self.speed_facts()
        return result

    def speed_facts(self) -> dict[str, Any]:
        """How the run went fast (results.json's ``speed``), once it is over."""
        finish(self.speed)
        options = self.options
        return {**self.speed.as_dict(), "sweep_reuse": options.sweep_reuse,
                "batch_size_auto": options.batch_size == "auto", "refill": options.refill,
                "segment_batches": self.per_segment}


def _eager_for_bpda(mode: str) -> tuple[bool, str | None]:
    """BPDA works through forward hooks, which a compiled model does not call: such runs stay eager."""
    if mode == "on":
        raise UsageError("--compile on: a compiled model does not run the hooks BPDA adds to its modules; use "
                         "--compile auto or off with bpda")
    return False, "auto: eager (BPDA's hooks do not run in a compiled model)" if mode == "auto" else None


class ProgressSink(Protocol):
    """What a progress display hears: the run's size, then each entry's part of each segment."""

    def start(self, samples: int, done: int) -> None: ...  # done: finished before a resume

    def entry_done(self, entry: int, samples: int) -> None: ...  # entry -1: the clean pass

    # Optional: note(line), a line from an attack with parts (AutoAttack after each member), see
    # _attack_logger; tick(entry, weight), passes an attack just made, see _attack_meter.


def dataset_fingerprint(dataset: ImageDataset, batch_size: int, workers: int = 0) -> str:
    """The same fingerprint ``run`` computes, without a model (distributed runs need the whole set's)."""
    return part_fingerprints(dataset, batch_size, 0, workers)[0]


def part_fingerprints(dataset: ImageDataset, batch_size: int, part_batches: int,
                      workers: int = 0) -> tuple[str, list[str]]:
    """In one read: the whole set's fingerprint and, with ``part_batches``, that of each run of so many
    batches (a part's, as ``PartRunner.part`` computes it)."""
    digests = DataDigest()
    parts: list[str] = []
    part = DataDigest()
    for b, (x, y, idx) in enumerate(iterate_batches(dataset, batch_size, workers, False)):
        data = batch_bytes(x, y, idx)
        digests.add_bytes(data)
        if part_batches:
            if b % part_batches == 0:
                part = DataDigest()
            part.add_bytes(data)
            if (b + 1) % part_batches == 0 or (b + 1) * batch_size >= len(dataset):
                parts.append(part.hexdigest())
    return digests.hexdigest(), parts


def _check_same_data(state: dict, digests: DataDigest, done: int, name: str) -> None:
    """Before any new batch: the batches the interrupted run finished must hold the same data now."""
    if state.get("data_digest") != digests.hexdigest():
        raise _data_changed(name, done)


def _data_changed(name: str, done: int) -> UsageError:
    return UsageError(f"cannot resume {name}: the data changed since the interrupted run (its first {done} "
                      "batches differ); start a new run with another --out")


def _auto_batch_size(forward, model: RobustModel, dataset: ImageDataset, device: torch.device) -> int:
    """The auto batch size probe is the model's first call on a GPU: explain its failures the same way."""
    sample = dataset[0][0].unsqueeze(0).to(device).float()
    try:
        return auto_batch_size(forward, sample, device)
    except RobenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported as one line
        raise explain_failure(model.model, sample, exc) from exc


def _first_forward(forward, model: RobustModel, x: torch.Tensor, first_call: SpeedReport | None) -> torch.Tensor:
    """The first batch's clean pass, checked: a failure is explained and the output must be (batch, classes)."""
    try:
        with torch.no_grad():
            logits = forward(x) if first_call is None else timed_first_call(forward, x, first_call)
    except RobenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - the model's own error, reported as one line
        raise explain_failure(model.model, x, exc) from exc
    check_output_shape(logits, len(x))
    return logits


# Batches attacked together: the pool refills across them. Each segment ends with a tail of
# steps on a draining pool (its slowest samples); 32 batches make that tail a few percent of
# a segment's steps (8 cost the digits PGD-10 bench a fifth of its time).
SEGMENT_BATCHES = 32
SEGMENT_BYTES = 1 << 30  # ... within this much input data (a segment sits on the device)


def segment_batches(batch_size: int, dataset: ImageDataset) -> int:
    """How many batches make one segment: refilling needs a queue longer than the pool, and
    progress is committed (and resumed) a segment at a time, so segments stay short."""
    image = dataset[0][0]
    fit = SEGMENT_BYTES // max(1, image.numel() * 4 * batch_size)
    return int(max(1, min(SEGMENT_BATCHES, fit)))


@dataclass
class _RunContext:
    """What stays fixed for a whole run; ``_run_segment`` reads it, the ``RunState`` receives the results."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    model: RobustModel
    entries: list[Entry]
    device: torch.device
    dataset: ImageDataset
    labels_known: np.ndarray | None  # every label, when the data gives them up front
    sweep_reuse: bool
    batch_size: int  # images per forward pass: the clean batches and the attacks' pools
    refill: bool
    progress: ProgressSink | None = None
    save_adversarial: int | None = None  # keep the first N samples' examples (0: all; None: none)
    checkpoint: Callable[[], None] | None = None  # saves a snapshot when one is due
    bpda: dict[int, BpdaHooks] = field(default_factory=dict)  # by entry index: the entries that use BPDA
    bpda_everywhere: bool = False  # every gradient entry uses BPDA: the sanity gradient checks run under it too


@dataclass
class _FirstBatch:
    """What the first batch a process computes (also after a resume) does besides its results."""

    run_checks: bool  # False after a resume: the snapshot holds the real first batch's report
    speed: SpeedReport | None  # receives the first forward call's time (compilation included); None: not timed


@dataclass
class _EntryOutcome:
    robust: torch.Tensor  # per sample of the segment
    seconds: float = 0.0
    gradient_evals: int = 0
    peak_memory: int | None = None
    found_by: torch.Tensor | None = None  # composite attacks: per sample of the segment, the part or -1
    examples: torch.Tensor | None = None  # --save-adversarial: the kept rows' examples (the clean image if unattacked)
    done: torch.Tensor | None = None  # an interrupted entry: the rows it finished (None: every row)
    norms: torch.Tensor | None = None  # minimum-norm entries: per sample, the smallest adversarial perturbation

    def record(self) -> dict[str, Any]:
        """As the progress file keeps it (plain CPU tensors and numbers)."""
        rows = len(self.robust)
        done = torch.ones(rows, dtype=torch.bool) if self.done is None else self.done.cpu()
        # norms only where there are some: the records of other entries are as they always were.
        norms = {} if self.norms is None else {"norms": self.norms.cpu()}
        return {"done": done, "robust": self.robust.cpu(), "seconds": self.seconds,
                "gradient_evals": self.gradient_evals, "peak_memory": self.peak_memory,
                "found_by": None if self.found_by is None else self.found_by.cpu(),
                "examples": None if self.examples is None else self.examples.cpu(), **norms}

    @classmethod
    def restored(cls, record: dict[str, Any], device: torch.device) -> "_EntryOutcome":
        def moved(value):
            return None if value is None else value.to(device)

        done = record["done"].to(device)
        return cls(moved(record["robust"]), record["seconds"], record["gradient_evals"], record["peak_memory"],
                   moved(record["found_by"]), moved(record["examples"]), None if bool(done.all()) else done,
                   moved(record.get("norms")))


@dataclass
class _Segment:
    """A segment after its clean pass: what every entry attacks and what is committed."""

    x: torch.Tensor
    y: torch.Tensor
    idx: torch.Tensor
    pred: torch.Tensor  # -1 where the logits are not finite
    finite: torch.Tensor
    digest: str  # of the data through it: the progress of a segment under way is only resumed on the same data
    keep: int  # leading rows whose examples are kept (--save-adversarial)

    @property
    def correct(self) -> torch.Tensor:
        return self.pred == self.y


class _SegmentInterrupted(KeyboardInterrupt):
    """Ctrl-C during a segment's attacks: the entries' outcomes so far (the last one possibly partial)."""

    def __init__(self, segment: _Segment, outcomes: list[_EntryOutcome]) -> None:
        super().__init__("interrupted")
        self.segment, self.outcomes = segment, outcomes


class _EntryInterrupted(KeyboardInterrupt):
    def __init__(self, outcome: _EntryOutcome) -> None:
        super().__init__("interrupted")
        self.outcome = outcome


def _run_segment(batches: list[tuple], context: _RunContext, state: RunState, first: _FirstBatch | None,
                 start: int, digest: str) -> None:
    """Clean pass batch by batch, then every entry over the whole segment, committed to ``state`` at the end.

    ``start`` is the number of batches committed before this segment, ``digest`` that of the data
    through it. Between entries (and when
    interrupted inside one) ``state.partial`` holds the entries' outcomes so far, so a snapshot keeps
    every finished (entry, sample) pair and a resumed run attacks only the rest.

    ``first`` is given for the first segment: its first batch's clean pass is probed (a model
    failure is explained, the output must be (batch, classes)), the model is asked whether it
    has an input gradient, and the checks of :mod:`robench.evaluation.sanity` run. With ``sweep_reuse``,
    an any-iterate attack listed with increasing eps attacks at each eps only the samples it
    has not fooled at the previous one.
    """
    segment = _clean_pass(batches, context, state, first, digest)
    saved = state.segment_progress(start, segment.digest, len(segment.y))
    outcomes = _attack_entries(segment, context, state, saved, start)
    _commit(state, segment, outcomes, context)
    state.partial = None


def _clean_pass(batches: list[tuple], context: _RunContext, state: RunState, first: _FirstBatch | None,
                digest: str) -> _Segment:
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    preds: list[torch.Tensor] = []
    finites: list[torch.Tensor] = []
    for b, (x, y, idx, _) in enumerate(batches):
        x = x.to(context.device, non_blocking=True).float()
        y = y.to(context.device, non_blocking=True).long()
        logits = _clean_logits(x, y, idx, context, state, first if b == 0 else None)
        finite = torch.isfinite(logits).all(dim=1)
        # A row with NaN/inf logits has no prediction (-1): it is never correct.
        preds.append(torch.where(finite, logits.argmax(dim=1), torch.full_like(y, -1)))
        xs.append(x)
        ys.append(y)
        finites.append(finite)
    y = torch.cat(ys)
    if context.progress:
        context.progress.entry_done(-1, len(y))
    keep = 0 if context.save_adversarial is None else samples_to_keep(context.save_adversarial, state.n, len(y))
    idx = torch.cat([b[2] for b in batches]).to(context.device)
    return _Segment(torch.cat(xs), y, idx, torch.cat(preds), torch.cat(finites), digest, keep)


def _clean_logits(x, y, idx, context: _RunContext, state: RunState, first: _FirstBatch | None) -> torch.Tensor:
    """The clean forward pass with its label checks, and on the first batch the probe and sanity checks."""
    if first is not None:
        logits = _first_forward(context.forward, context.model, x, first.speed)
    else:
        with torch.no_grad():
            logits = context.forward(x)
    if state.num_classes < 0:
        state.num_classes = logits.shape[1]
    if context.labels_known is None:
        check_labels(y.cpu().numpy(), state.num_classes, idx.numpy())
    elif first is not None:  # labels known up front: check them all once, on the first batch
        check_labels(context.labels_known, state.num_classes, context.dataset.indices)
    if first is not None:
        _first_batch_sanity(x, y, logits, context, state, first.run_checks)
    return logits


def _first_batch_sanity(x, y, logits, context: _RunContext, state: RunState, run_checks: bool) -> None:
    """The input-gradient probe and, unless a resume keeps the real first batch's, the sanity checks.

    With BPDA the gradient checks also run under each BPDA setting (``sanity.bpda``): before any
    attack, so a setting that cannot work fails now. When every gradient entry uses BPDA the run's
    own gradient findings are those its attacks see, the worst of the settings'.
    """
    # Two images suffice: the answer is about the model's graph, not the data.
    state.sanity["input_gradient"] = context.model.has_input_gradient(x[:2])
    if run_checks:
        state.sanity.update(first_batch_checks(context.forward, x, y, logits))
    if not context.bpda:
        return
    probes = bpda_checks(context.model, context.forward, x, y, logits, distinct_settings(context.bpda),
                         zero_fraction=run_checks)
    if run_checks:
        state.sanity["bpda"] = probes
    if context.bpda_everywhere:
        state.sanity.update(worst_gradient_checks(probes))


def _commit(state: RunState, segment: _Segment, outcomes: list[_EntryOutcome], context: _RunContext,
            rows: torch.Tensor | None = None) -> None:
    """Fold the segment's outcomes into ``state``: all its rows, or those ``rows`` marks (an interruption's)."""
    pick = slice(None) if rows is None else rows
    kept = _kept_examples(segment.x[:segment.keep], outcomes, context) if segment.keep else None
    correct = segment.correct[pick]
    totals = state.totals
    totals.clean.update(correct)
    totals.index.update(segment.idx[pick])
    totals.labels.update(segment.y[pick])
    totals.pred.update(segment.pred[pick])
    totals.nonfinite.update(int((~segment.finite[pick]).sum()))
    worst = correct.clone()
    attacked = bool(correct.any())
    for counts, result in zip(state.entries, outcomes):
        robust = result.robust[pick]
        counts.accuracy.update(robust)
        counts.robust.update(robust)
        if attacked:  # success among the clean-correct samples, the ones an entry attacks
            counts.fooled.update(~robust[correct])
        counts.seconds.update(result.seconds)
        counts.gradient_evals.update(result.gradient_evals)
        if result.peak_memory is not None:
            counts.peak_memory.update(result.peak_memory)
        if result.found_by is not None:
            counts.found_by.update(result.found_by[pick])
        if result.norms is not None:
            counts.norms.update(result.norms[pick])
        worst &= robust
    totals.robust_all.update(worst)
    if kept is not None:
        assert state.examples is not None  # rows are kept only when the run keeps examples
        kept_rows = slice(None) if rows is None else rows[:segment.keep].cpu()
        for name, values in kept.items():
            state.examples.metrics[name].update(values[kept_rows])


def _with_finished_rows(state: RunState, stop: _SegmentInterrupted, context: _RunContext) -> RunState:
    """The committed samples and, in a copy, the interrupted segment's samples that every entry finished."""
    segment, outcomes = stop.segment, stop.outcomes
    if len(outcomes) < len(context.entries):
        return state  # some entries never reached the segment: none of its samples is finished
    rows = torch.ones_like(segment.correct)
    for outcome in outcomes:
        if outcome.done is not None:
            rows &= outcome.done
    if not bool(rows.any()):
        return state
    shown = RunState.from_state_dict(state.state_dict())
    _commit(shown, segment, outcomes, context, rows)
    return shown


def _attack_entries(segment: _Segment, context: _RunContext, state: RunState, saved: list[dict],
                    start: int) -> list[_EntryOutcome]:
    """Every entry on the clean-correct samples of one segment (committed by the caller).

    ``saved``: the entries' outcomes an interrupted run kept for this segment; a finished entry is
    taken as it is, a partial one attacks only the samples it had not finished.
    """
    outcomes: list[_EntryOutcome] = []
    reuse = _SweepReuse(context.sweep_reuse)
    minimal = _MinimalPerturbations()
    for entry, counts in zip(context.entries, state.entries):
        before = saved[entry.index] if entry.index < len(saved) else None
        if before is not None and bool(before["done"].all()):
            result = _EntryOutcome.restored(before, context.device)
        else:
            try:
                # entry_metrics makes ``chunk`` a Scalar.
                if entry.attack.minimum_norm:
                    result = minimal.read(entry, cast(Scalar, counts.chunk), context, segment)
                else:
                    result = _attack_entry(entry, cast(Scalar, counts.chunk), context, segment, reuse, before)
            except _EntryInterrupted as stop:
                outcomes.append(stop.outcome)
                state.partial = _segment_record(start, segment, outcomes)
                raise _SegmentInterrupted(segment, outcomes) from stop.__cause__
        reuse.remember(entry, segment, result)
        outcomes.append(result)
        state.partial = _segment_record(start, segment, outcomes)
        if context.progress:
            context.progress.entry_done(entry.index, len(segment.y))
        if context.checkpoint:
            context.checkpoint()
    return outcomes


def _segment_record(start: int, segment: _Segment, outcomes: list[_EntryOutcome]) -> dict[str, Any]:
    # The outcomes themselves: copied to the CPU (``record``) only when a snapshot is written.
    return {"start": start, "digest": segment.digest, "entries": list(outcomes)}


class _SweepReuse:
    """``sweep_reuse``: per suite entry, the eps reached, the samples fooled there and their kept examples."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.fooled: dict[int, tuple[float, torch.Tensor]] = {}
        self.examples: dict[int, torch.Tensor | None] = {}

    def prior(self, entry: Entry) -> torch.Tensor | None:
        """Samples fooled at a smaller eps of the same attack: their examples lie in this larger ball too."""
        eps = _reuse_eps(entry) if self.enabled else None
        if eps is None:
            return None
        found = self.fooled.get(id(entry.spec))
        return found[1] if found is not None and eps >= found[0] else None

    def apply(self, entry: Entry, result: _EntryOutcome, keep: int) -> None:
        prior = self.prior(entry)
        if prior is None:
            return
        result.robust &= ~prior
        earlier = self.examples[id(entry.spec)]
        # Examples exist when rows are kept (keep > 0): a reused sample's is the one found at the smaller eps.
        if result.examples is not None and earlier is not None:
            reused = prior[:keep]
            result.examples[reused] = earlier[reused]

    def remember(self, entry: Entry, segment: _Segment, result: _EntryOutcome) -> None:
        eps = _reuse_eps(entry)
        if eps is not None:
            self.fooled[id(entry.spec)] = (eps, segment.correct & ~result.robust)
            self.examples[id(entry.spec)] = result.examples


class _MinimalPerturbations:
    """Minimum-norm suite entries: in each segment, one search without an eps finds every sample's smallest
    adversarial perturbation, and each eps of the suite entry reads it (robust at eps iff that is larger)."""

    def __init__(self) -> None:
        self.searches: dict[int, _EntryOutcome] = {}  # by suite entry (its spec): the search's outcome

    def read(self, entry: Entry, chunk: Scalar, context: _RunContext, segment: _Segment) -> _EntryOutcome:
        """The entry's outcome at its eps; the first of its suite entry's eps runs the search.

        A run resumed inside a segment searches it again rather than keep an interrupted search's rows: the
        search is deterministic (its randomness is keyed by the sample), so the norms come out the same.
        """
        search = self.searches.get(id(entry.spec))
        if search is not None:
            return _read_at(search, entry.eps, segment, spent=False)
        targets = torch.nonzero(segment.correct).squeeze(1)
        try:
            search = _attack_segment(entry, chunk, context, segment, targets, None, unbounded=True)
        except _EntryInterrupted as stop:
            partial = _read_at(stop.outcome, entry.eps, segment, spent=True)
            partial.done = stop.outcome.done
            raise _EntryInterrupted(partial) from stop.__cause__
        self.searches[id(entry.spec)] = search
        return _read_at(search, entry.eps, segment, spent=True)


def _read_at(search: _EntryOutcome, eps: float | None, segment: _Segment, spent: bool) -> _EntryOutcome:
    """A search's outcome at ``eps``: robust where the smallest perturbation found is larger (misclassified
    samples have norm 0), and the kept examples where it lies within eps (the clean image elsewhere).
    ``spent``: the search's time and passes count for this entry (the first of its suite entry)."""
    assert search.norms is not None  # an unbounded search measures every row
    within = search.norms <= (float("inf") if eps is None else eps)
    examples = None
    if search.examples is not None:  # rows are kept (keep > 0)
        keep = len(search.examples)
        mask = within[:keep].view(-1, *[1] * (search.examples.dim() - 1))
        examples = torch.where(mask, search.examples, segment.x[:keep].to(search.examples.dtype))
    if not spent:
        return _EntryOutcome(~within, examples=examples, norms=search.norms)
    return _EntryOutcome(~within, search.seconds, search.gradient_evals, search.peak_memory, examples=examples,
                         norms=search.norms)


def _attack_entry(entry: Entry, chunk: Scalar, context: _RunContext, segment: _Segment, reuse: _SweepReuse,
                  before: dict | None) -> _EntryOutcome:
    """One entry on the segment: the clean-correct samples, less those sweep reuse already settles."""
    targets = torch.nonzero(segment.correct).squeeze(1)
    prior = reuse.prior(entry)
    if prior is not None:
        targets = targets[~prior[targets]]
    try:
        result = _attack_segment(entry, chunk, context, segment, targets, before)
    except _EntryInterrupted as stop:
        reuse.apply(entry, stop.outcome, segment.keep)
        raise
    reuse.apply(entry, result, segment.keep)
    return result


def _attack_logger(entry: Entry, context: _RunContext) -> Callable[[str], None] | None:
    """The progress display's ``note`` with the entry's name and eps in front, when it has one."""
    note = getattr(context.progress, "note", None)
    if note is None or not entry.attack.parts():
        return None
    name = entry.spec.display_name() + (f" eps {entry.eps_text}" if entry.eps is not None else "")
    return lambda message: note(f"{name}: {message}")


def _attack_meter(entry: Entry, context: _RunContext) -> Callable[[int, int], None] | None:
    """The progress display's ``tick`` for the entry: passes weighed as ``entry_weights`` weighs them."""
    tick = getattr(context.progress, "tick", None)
    if tick is None:
        return None
    return lambda gradient, forward: tick(entry.index, 3 * gradient + forward)


def _reuse_eps(entry: Entry) -> float | None:
    """The entry's eps when sweep reuse applies to it, else None. Reuse needs nested threat models (an
    eps-ball), any-iterate semantics (a fooled example stays valid) and eps in pixel units (per-channel
    radii are kept out, as before)."""
    attack = entry.attack
    reusable = (attack.eps_budget != "none" and not attack.final_iterate and attack.eps_scale is None
                and not attack.minimum_norm)  # those read every eps from one search
    return entry.eps if reusable else None


def _attack_with_backoff(entry: Entry, chunk: Scalar, context: _RunContext, x, y, idx,
                         unbounded: bool = False) -> AttackResult:
    """Attack with a pool of ``batch_size`` slots, halving it on out-of-memory and starting again.

    Results do not change: every sample's randomness is keyed by its index, not by the
    slot it lands in. The smallest pool used is recorded in ``chunk`` (right away: the
    next segments start from it).
    """
    size = int(chunk.compute() or context.batch_size)  # the chunk holds the int sizes it was given
    while True:
        try:
            return entry(context.forward, x, y, idx, batch_size=size, refill=context.refill, unbounded=unbounded)
        except torch.cuda.OutOfMemoryError as exc:
            if context.device.type == "cuda":
                torch.cuda.empty_cache()
            if size == 1:
                raise RunError(f"{entry.spec.display_name()}: out of memory even for one image") from exc
            size = max(1, size // 2)
            chunk.update(size)


def _attack_segment(entry: Entry, chunk: Scalar, context: _RunContext, segment: _Segment, targets: torch.Tensor,
                    before: dict | None, unbounded: bool = False) -> _EntryOutcome:
    """Attack the rows ``targets`` of the segment (misclassified ones are already not robust).

    ``before`` (an interrupted run's outcome of this entry) settles the rows it finished. The
    examples of the segment's first ``keep`` rows are returned too (clean where not attacked).
    Ctrl-C raises ``_EntryInterrupted`` with the rows the attack had finished. ``unbounded``: a
    minimum-norm attack's search without an eps (robust then means that no adversarial example was
    found at all); the outcome holds the norms.
    """
    keep = segment.keep
    result = _EntryOutcome(segment.correct.clone(), found_by=torch.full_like(segment.idx, -1)
                           if entry.attack.parts() else None, examples=segment.x[:keep].clone() if keep else None)
    if unbounded:  # misclassified clean: norm 0; the attacked rows are measured
        result.norms = torch.where(segment.correct, float("inf"), 0.0).double()
    if before is not None:
        targets = _take_finished(result, before, targets, keep)
    if not targets.numel():
        return result
    device = context.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    attack: AttackResult | None
    finished: torch.Tensor | None
    interruption: KeyboardInterrupt
    try:
        with hooks_during(context.bpda, entry):
            attack = _attack_with_backoff(entry, chunk, context, segment.x[targets], segment.y[targets],
                                          segment.idx[targets], unbounded)
        finished = None
    except AttackInterrupted as stop:
        attack, finished, interruption = stop.result, stop.done, stop
    except KeyboardInterrupt as stop:  # an attack that keeps nothing of an interrupted call
        attack, finished, interruption = None, torch.zeros_like(targets, dtype=torch.bool), stop
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result.peak_memory = _larger(result.peak_memory, torch.cuda.max_memory_allocated(device))
    result.seconds += time.perf_counter() - t0
    if attack is not None:
        _take_attack(result, attack, targets, finished, keep)
    if finished is None:
        return result
    result.done = torch.ones_like(segment.correct)
    result.done[targets[~finished.to(targets.device)]] = False
    raise _EntryInterrupted(result) from interruption


def _take_finished(result: _EntryOutcome, before: dict, targets: torch.Tensor, keep: int) -> torch.Tensor:
    """Copy the rows an interrupted run finished into ``result``; returns the targets still to attack."""
    earlier = _EntryOutcome.restored(before, result.robust.device)
    done = earlier.done if earlier.done is not None else torch.ones_like(result.robust)
    result.robust[done] = earlier.robust[done]
    if result.found_by is not None and earlier.found_by is not None:
        result.found_by[done] = earlier.found_by[done]
    if result.examples is not None and earlier.examples is not None:  # rows are kept (keep > 0)
        result.examples[done[:keep]] = earlier.examples[done[:keep]]
    result.seconds, result.gradient_evals = earlier.seconds, earlier.gradient_evals
    result.peak_memory = earlier.peak_memory
    return targets[~done[targets]]


def _take_attack(result: _EntryOutcome, attack: AttackResult, targets: torch.Tensor, finished: torch.Tensor | None,
                 keep: int) -> None:
    """The attack's verdicts (and examples, found_by) on ``targets``, or on the ``finished`` ones of them."""
    rows, success, found_by, x_adv, norms = targets, attack.success, attack.found_by, attack.x_adv, attack.norms
    if finished is not None:
        finished = finished.to(targets.device)
        rows, success, x_adv = targets[finished], success[finished], x_adv[finished]
        found_by = None if found_by is None else found_by[finished]
        norms = None if norms is None else norms[finished]
    result.robust[rows] = ~success
    if result.norms is not None and norms is not None:
        result.norms[rows] = norms.to(result.norms.device)
    result.gradient_evals += attack.gradient_evals
    if result.found_by is not None and found_by is not None:
        result.found_by[rows] = found_by
    if result.examples is not None:  # rows are kept (keep > 0)
        among_kept = rows < keep
        result.examples[rows[among_kept]] = x_adv[among_kept].to(result.examples.dtype)


def _larger(a: int | None, b: int | None) -> int | None:
    return b if a is None else (a if b is None else max(a, b))


def _kept_examples(x: torch.Tensor, outcomes: list[_EntryOutcome], context: _RunContext) -> dict[str, torch.Tensor]:
    """The kept rows as the run scored them (float) with the model's predictions of their 8-bit roundings.

    The floats are what reproduces the run's verdicts; the 8-bit images are rounded again from them when
    the files are written (:mod:`robench.results.adversarial`), so only their predictions are kept here.
    """
    clean = quantize_clean(x)
    clean_pred = _predict(clean, context)
    # A copy: ``x`` is a view of the whole segment, whose storage would stay alive with it.
    kept = {"clean": x.to("cpu", copy=True), "clean_pred": clean_pred.cpu()}
    for j, outcome in enumerate(outcomes):
        assert outcome.examples is not None  # every outcome holds the kept rows' examples
        adversarial = quantize_adversarial(x, outcome.examples)
        # Unchanged images need no second pass: their prediction is the clean one.
        changed = (adversarial != clean).flatten(1).any(dim=1)
        pred = clean_pred.clone()
        if bool(changed.any()):
            pred[changed] = _predict(adversarial[changed], context)
        kept[f"adversarial{j}"], kept[f"adv_pred{j}"] = outcome.examples.cpu(), pred.cpu()
    return kept


def _predict(images: torch.Tensor, context: _RunContext) -> torch.Tensor:
    """Predicted classes of uint8 images, a batch at a time; -1 where the logits are not finite."""
    preds = []
    with torch.no_grad():
        for part in images.split(context.batch_size):
            logits = context.forward(from_8bit(part.to(context.device)))
            finite = torch.isfinite(logits).all(dim=1)
            preds.append(torch.where(finite, logits.argmax(dim=1), torch.full_like(finite, -1, dtype=torch.long)))
    return torch.cat(preds)
