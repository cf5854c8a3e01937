"""Re-identification runs: clean CMC/mAP, then each attack entry with the other split clean.

The gallery (or, with ``perturb="gallery"``, the query set) is extracted once
and reused by every entry. White-box entries attack the target; entries with
``source: surrogate`` are computed on the surrogate and evaluated on the
target (black-box transfer). Mis-ranking entries attack batches of whole
identities (``ids_per_batch`` persons with all their images), as the loss
compares images of the same and of different persons.

A run is resumable by setting (one attack entry at one eps): each setting's
result depends only on the seed, the entry's position in the suite and the
sample indices (its random streams are keyed by them, see ``build_entries``),
never on which settings ran before, so finished settings are kept from an
interrupted run and the others computed as if it had not stopped.

Under torchrun the clean features and each setting's groups are work units
that the processes claim (``robench.reid.queued``); every process then holds
the same features as a single process and computes the same metrics. Rank 0
keeps the progress file: the finished settings and the saved units of the
setting under way, so that the same command resumes with any number of
processes, a single one included.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from robench.evaluation import distributed
from robench.evaluation.entries import Entry, build_entries
from robench.evaluation.work_queue import is_queue_progress
from robench.errors import UsageError
from robench.models.wrapper import evaluation_mode
from robench.reid.datasets import ReIDData, ReIDImages, ReIDSplit
from robench.reid.features import ReIDFeatures, extract
from robench.reid.metrics import distance_matrix, rank_metrics
from robench.attacks.objectives import Objective, Unscored
from robench.reid.objectives import objective
from robench.reid.queued import UNFIT_PROGRESS, RowsWork
from robench.suites import Suite

DEFAULT_IDS_PER_BATCH = 8
# The payload of a ReID run's progress snapshot (written to the run's progress file by the runner).
REID_PROGRESS_FORMAT = "robench.reid-progress/1"


@dataclass
class ReIDOptions:
    metric: str = "euclidean"
    ranks: tuple[int, ...] = (1, 5, 10)
    ap: str = "noninterp"
    denominator: str = "valid"
    minp: bool = True
    rerank: bool = False
    perturb: str = "query"  # or "gallery"
    size: tuple[int, int] | None = None
    batch_size: int = 64
    workers: int = 0
    seed: int = 0
    save_every: float = 2.0  # seconds between snapshots of the setting under way


@dataclass
class EntryProgress:
    """The setting under way: the rows attacked so far (whole groups), their adversarial features
    and the seconds spent on them; a resume attacks only the other groups."""

    index: int
    label: str
    rows: list[int]
    features: Callable[[], torch.Tensor]  # [len(rows), D]; copied out only when a snapshot is written
    seconds: float

    def snapshot(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "rows": torch.tensor(self.rows, dtype=torch.int64),
                "features": self.features().detach().cpu(), "seconds": self.seconds}


@dataclass
class UnitsProgress:
    """The setting under way on the work queue (torchrun): the queue's snapshot of its saved units
    (``run_queue``'s progress); a resume computes only the other units."""

    index: int
    label: str
    job: dict[str, Any]

    def snapshot(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "job": self.job}


@dataclass
class ReIDOutcome:
    """What a run measured; ``attacks`` holds the finished settings in suite order (all of them when
    ``complete``), ``total`` how many the suite has. ``clean`` is None only when a new run was
    stopped before the clean features were extracted."""

    clean: dict[str, Any] | None
    clean_reranked: dict[str, Any] | None
    attacks: list[dict[str, Any]] = field(default_factory=list)
    nonfinite_features: int = 0
    fingerprint: str = ""
    seconds: float = 0.0
    total: int = 0
    complete: bool = True
    indices: list[int] = field(default_factory=list)  # the entry index of each row of ``attacks``
    partial: EntryProgress | UnitsProgress | None = None  # the setting under way, when some of it is done
    work_units: dict[str, Any] | None = None  # torchrun: the work-queue jobs' units, all jobs added up

    def snapshot(self) -> dict[str, Any]:
        """The finished settings as plain values (torch.save-able with weights_only), for ``resume_state``."""
        plain = json.loads(json.dumps({"clean": self.clean, "clean_reranked": self.clean_reranked,
                                       "settings": [{"index": i, "row": row}
                                                    for i, row in zip(self.indices, self.attacks)]}))
        # A single process's groups under "partial", a torchrun job's units under "queued".
        under_way = {} if self.partial is None else \
            {"partial" if isinstance(self.partial, EntryProgress) else "queued": self.partial.snapshot()}
        return {"format": REID_PROGRESS_FORMAT, "fingerprint": self.fingerprint, "total": self.total,
                "nonfinite_features": self.nonfinite_features, "seconds": self.seconds, **plain, **under_way}

    def count_units(self, facts: dict[str, Any]) -> None:
        """Add a work-queue job's units (``Queued.facts``) to ``work_units``."""
        kept = self.work_units or {"units": 0, "resumed": 0}
        self.work_units = {"units": kept["units"] + facts["units"], "resumed": kept["resumed"] + facts["resumed"],
                           "processes": facts["processes"]}


class ReIDRunInterrupted(Exception):
    """Ctrl-C or SIGTERM during a ReID run: ``outcome`` holds the finished settings (complete=False)."""

    def __init__(self, outcome: ReIDOutcome) -> None:
        super().__init__("the re-identification run was interrupted")
        self.outcome = outcome


def _loader(split: ReIDSplit, options: ReIDOptions, indices: list[int] | None = None) -> DataLoader:
    dataset: Dataset = ReIDImages(split, options.size)
    if indices is not None:
        dataset = Subset(dataset, indices)
    return DataLoader(dataset, batch_size=options.batch_size, shuffle=False, num_workers=options.workers)


def identity_batches(pids: np.ndarray, ids_per_batch: int) -> list[list[int]]:
    """Indices grouped so that every batch holds all images of ``ids_per_batch`` persons."""
    order = np.argsort(pids, kind="stable")
    batches: list[list[int]] = []
    current: list[int] = []
    seen: list[int] = []
    for i in order:
        pid = int(pids[i])
        if pid not in seen:
            if len(seen) == ids_per_batch:
                batches.append(current)
                current, seen = [], []
            seen.append(pid)
        current.append(int(i))
    if current:
        batches.append(current)
    return batches


def _extract_all(features: ReIDFeatures, split: ReIDSplit, options: ReIDOptions, device: torch.device,
                 outcome: ReIDOutcome) -> torch.Tensor:
    """Features of a whole split; under torchrun its batches are work units, claimed by every process."""
    if distributed.world()[1] == 1:
        return extract(features, _loader(split, options), device)

    def rows_of(start: int, stop: int) -> list[int]:
        return list(range(start, stop))

    def compute(start: int, stop: int) -> torch.Tensor:
        # Units start on a batch boundary: the batches are the single-process loader's, and so are the features.
        return extract(features, _loader(split, options, rows_of(start, stop)), device)

    # Not saved: a resumed run extracts the clean features again, as a single process does.
    job = RowsWork(len(split), options.batch_size, rows_of, compute, total=len(split)).run(device)
    outcome.count_units(job.facts)
    return job.features.to(device)


def _metrics(qf, gf, q: ReIDSplit, g: ReIDSplit, options: ReIDOptions, rerank: bool) -> dict[str, Any]:
    if rerank:
        from robench.reid.rerank import k_reciprocal_rerank

        dist = k_reciprocal_rerank(qf, gf)
    else:
        dist = distance_matrix(qf, gf, options.metric)
    device = dist.device
    result = rank_metrics(
        dist, torch.from_numpy(q.pids).to(device), torch.from_numpy(g.pids).to(device),
        torch.from_numpy(q.camids).to(device), torch.from_numpy(g.camids).to(device),
        ranks=options.ranks, ap=options.ap, denominator=options.denominator, minp=options.minp,
    )
    out = {f"rank{k}": v for k, v in result["cmc"].items()}
    out.update({"mAP": result["mAP"], "mINP": result.get("mINP"), "queries": result["queries"],
                "valid_queries": result["valid_queries"], "ap_convention": result["ap_convention"],
                "denominator": result["denominator"], "distance": "rerank" if rerank else options.metric})
    return out


def run_reid(
    target: ReIDFeatures,
    data: ReIDData,
    suite: Suite,
    *,
    surrogate: ReIDFeatures | None,
    options: ReIDOptions,
    device: torch.device,
    on_step: Callable[[str], None] | None = None,
    resume_state: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None,
) -> ReIDOutcome:
    """Clean metrics, then each setting (attack entry x eps) in suite order.

    ``save_state`` receives a snapshot (``ReIDOutcome.snapshot``) after each finished
    setting; ``resume_state`` (such a snapshot, of a run with the same model, data,
    suite and options) skips the settings it holds and reuses their rows. The clean
    features are extracted again, as every attack needs them, and the clean metrics
    computed again from them; the snapshot's serve only a run stopped before that.
    Ctrl-C or SIGTERM raise ``ReIDRunInterrupted`` holding the finished settings.

    Under torchrun every process calls it inside ``distributed.process_group``; only rank 0 passes
    ``resume_state`` and ``save_state`` (it alone keeps the progress file).
    """
    started = time.perf_counter()
    target.to(device)
    _check_suite(suite, surrogate)
    entries = build_entries(suite, target, options.seed, loss_for=entry_objective)
    # Only rank 0 read the progress file; every process must skip the same settings (and refuse alike).
    resume_state = distributed.from_first(resume_state)
    outcome, finished, earlier = _starting_point(resume_state, entries, _fingerprint(data))
    snapshots = _Snapshots(outcome, finished, save_state, options.save_every, earlier, started)
    try:
        with contextlib.ExitStack() as modes:
            for model in [target] + ([surrogate.to(device)] if surrogate is not None else []):
                modes.enter_context(evaluation_mode(model))
            qf, gf = _clean_features(target, data, options, device, outcome, on_step)
            split = data.query if options.perturb == "query" else data.gallery
            kept = _restore_partial(resume_state, entries, finished, len(split), qf.shape[1]) if resume_state else None
            # The attacked split is read from disk once, then shared by every entry (8-bit, as on disk).
            images = _ImageCache(split, options.size)
            for entry in (e for e in entries if e.index not in finished):
                if on_step:
                    on_step(f"{entry.spec.display_name()} eps {entry.eps_text}")
                carried = kept if kept is not None and kept.index == entry.index else None
                finished[entry.index] = _run_entry(entry, target, surrogate, data, qf, gf, options, device, images,
                                                   kept=carried, snapshots=snapshots)
                snapshots.entry_done()
    except KeyboardInterrupt as exc:
        _settle(outcome, finished, earlier + time.perf_counter() - started)
        outcome.complete = False
        if save_state and outcome.partial is not None:  # what the setting under way has done
            save_state(outcome.snapshot())
        raise ReIDRunInterrupted(outcome) from exc
    _settle(outcome, finished, earlier + time.perf_counter() - started)
    return outcome


def _starting_point(resume_state: dict[str, Any] | None, entries: list[Entry],
                    fingerprint: str) -> tuple[ReIDOutcome, dict[int, dict[str, Any]], float]:
    """A new run's empty outcome, or what an interrupted run finished: its outcome, its finished
    settings (entry index -> row; a dict assignment is atomic under Ctrl-C) and its seconds."""
    if resume_state is None:
        return ReIDOutcome(None, None, fingerprint=fingerprint, total=len(entries)), {}, 0.0
    done = _restore(resume_state, entries, fingerprint)
    outcome = ReIDOutcome(resume_state["clean"], resume_state["clean_reranked"],
                          nonfinite_features=resume_state["nonfinite_features"], fingerprint=fingerprint,
                          total=len(entries))
    return outcome, dict(done), float(resume_state.get("seconds", 0.0))


class _Snapshots:
    """Progress snapshots: after every finished setting, and within a setting after a group at most
    every ``save_every`` seconds."""

    def __init__(self, outcome: ReIDOutcome, finished: dict[int, dict[str, Any]],
                 save_state: Callable[[dict[str, Any]], None] | None, save_every: float, earlier: float,
                 started: float) -> None:
        self.outcome, self.finished, self.save_state, self.save_every = outcome, finished, save_state, save_every
        self.earlier, self.started, self.last = earlier, started, time.perf_counter()

    def group_done(self, progress: EntryProgress) -> None:
        self.outcome.partial = progress
        if self.save_state and time.perf_counter() - self.last >= self.save_every:
            self._save()

    def units_saved(self, progress: UnitsProgress) -> None:
        """The work queue's snapshot of the setting under way (it decides when, and calls only on rank 0)."""
        self.outcome.partial = progress
        if self.save_state:
            self._save()

    def entry_done(self) -> None:
        self.outcome.partial = None
        if self.save_state:
            self._save()

    def _save(self) -> None:
        assert self.save_state is not None
        _settle(self.outcome, self.finished, self.earlier + time.perf_counter() - self.started)
        self.save_state(self.outcome.snapshot())
        self.last = time.perf_counter()


def _check_suite(suite: Suite, surrogate: ReIDFeatures | None) -> None:
    for spec in suite.attacks:
        if spec.source == "surrogate" and surrogate is None:
            raise UsageError(f"{spec.display_name()} is a transfer attack: the suite or --surrogate must name "
                             "a surrogate model")
        if spec.bpda:
            raise UsageError(f"{spec.display_name()}: bpda applies to classification runs; re-identification "
                             "attacks differentiate through the model as it is")
        if spec.attack_class.family not in ("gradient", "generator", "transfer"):
            raise UsageError(f"{spec.attack} does not apply to re-identification models; use dmr, or a gradient "
                             "attack (fgsm, bim, pgd, mifgsm) with an objective (away, odfa, misrank)")


def _clean_features(target: ReIDFeatures, data: ReIDData, options: ReIDOptions, device: torch.device,
                    outcome: ReIDOutcome, on_step: Callable[[str], None] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and gallery features of the clean images, and the clean metrics (into ``outcome``)."""
    q, g = data.query, data.gallery
    if on_step:
        on_step("gallery features")
    gf = _extract_all(target, g, options, device, outcome)
    if on_step:
        on_step("query features")
    qf = _extract_all(target, q, options, device, outcome)
    outcome.nonfinite_features = int((~torch.isfinite(qf).all(dim=1)).sum() + (~torch.isfinite(gf).all(dim=1)).sum())
    outcome.clean = _metrics(qf, gf, q, g, options, False)
    outcome.clean_reranked = _metrics(qf, gf, q, g, options, True) if options.rerank else None
    return qf, gf


def _settle(outcome: ReIDOutcome, finished: dict[int, dict[str, Any]], seconds: float) -> None:
    outcome.indices = sorted(finished)
    outcome.attacks = [finished[i] for i in outcome.indices]
    outcome.seconds = seconds


def _fingerprint(data: ReIDData) -> str:
    digest = hashlib.sha256()
    for split in (data.query, data.gallery):
        digest.update("\n".join(f"{p.name}" for p in split.files).encode())
        digest.update(split.pids.tobytes() + split.camids.tobytes())
    return digest.hexdigest()


def _restore(state: dict[str, Any], entries: list[Entry], fingerprint: str) -> dict[int, dict[str, Any]]:
    """The rows of the settings a snapshot holds, by entry index, after checking it fits this run."""
    if not isinstance(state, dict) or state.get("format") != REID_PROGRESS_FORMAT:
        raise UsageError("cannot resume: the progress file is not that of a robench re-identification run")
    if state["fingerprint"] != fingerprint:
        raise UsageError("cannot resume: the query or gallery files differ from the interrupted run's; "
                         "start a new run with another --out")
    done: dict[int, dict[str, Any]] = {}
    for saved in state["settings"]:
        index, row = saved["index"], saved["row"]
        if state["total"] != len(entries) or not 0 <= index < len(entries) \
                or row.get("label") != entries[index].spec.display_name():
            raise UsageError("cannot resume: the suite has changed since the interrupted run")
        done[index] = row
    return done


def _restore_partial(state: dict[str, Any], entries: list[Entry], finished: dict[int, dict[str, Any]],
                     rows: int, dim: int) -> EntryProgress | UnitsProgress | None:
    """The setting a snapshot was in the middle of, checked against this run (a progress file is input):
    under torchrun a job's saved units; in a single process its finished groups, or a torchrun job's units
    as the groups they hold."""
    if distributed.world()[1] > 1:
        # A single process's finished groups are no units of a plan: that setting is attacked anew (same result).
        return _restore_units(state, entries, finished)
    try:
        saved = state["partial"] if "partial" in state else _units_as_groups(state.get("queued"))
        if saved is None:
            return None
        index, label, seconds = int(saved["index"]), str(saved["label"]), float(saved["seconds"])
        done, features = saved["rows"], saved["features"]
        fits = (_fits_entry(index, label, entries, finished)
                and isinstance(done, torch.Tensor) and done.dtype == torch.int64 and done.dim() == 1
                and isinstance(features, torch.Tensor) and features.dtype == torch.float32
                and tuple(features.shape) == (len(done), dim) and seconds >= 0
                and bool(((done >= 0) & (done < rows)).all()) and len(torch.unique(done)) == len(done))
    except (KeyError, TypeError, ValueError, RuntimeError):  # RuntimeError: units that do not concatenate
        fits = False
    if not fits:
        raise UsageError(UNFIT_PROGRESS)
    return EntryProgress(index, label, done.tolist(), lambda: features, seconds)


def _restore_units(state: dict[str, Any], entries: list[Entry],
                   finished: dict[int, dict[str, Any]]) -> UnitsProgress | None:
    """A torchrun job's setting under way; the queue checks each saved unit as it resumes it."""
    saved = state.get("queued")
    if saved is None:
        return None
    try:
        index, label, job = int(saved["index"]), str(saved["label"]), saved["job"]
        fits = _fits_entry(index, label, entries, finished) and is_queue_progress(job)
    except (KeyError, TypeError, ValueError):
        fits = False
    if not fits:
        raise UsageError(UNFIT_PROGRESS)
    return UnitsProgress(index, label, job)


def _units_as_groups(saved: dict[str, Any] | None) -> dict[str, Any] | None:
    """A torchrun job's saved units as a single process's setting under way (``EntryProgress.snapshot``)."""
    units = [] if saved is None else list(saved["job"]["units"].values())
    if saved is None or not units:
        return None
    records = [unit["unit"] for unit in units]
    return {"index": saved["index"], "label": saved["label"], "rows": torch.cat([r["rows"] for r in records]),
            "features": torch.cat([r["features"] for r in records]),
            "seconds": sum(float(unit["seconds"]) for unit in units)}


def _fits_entry(index: int, label: str, entries: list[Entry], finished: dict[int, dict[str, Any]]) -> bool:
    return 0 <= index < len(entries) and index not in finished and label == entries[index].spec.display_name()


class _ImageCache:
    """Decoded images of one split, kept as uint8 and handed out as [0,1] floats (values unchanged)."""

    def __init__(self, split: ReIDSplit, size: tuple[int, int] | None) -> None:
        self.images = ReIDImages(split, size)
        self.cache: dict[int, torch.Tensor] = {}

    def batch(self, indices: list[int]) -> torch.Tensor:
        for i in indices:
            if i not in self.cache:
                self.cache[i] = torch.round(self.images[i][0] * 255).to(torch.uint8)
        return torch.stack([self.cache[i] for i in indices]).float().div_(255.0)


def _margin(spec) -> float:
    return spec.margin if spec.margin is not None else 0.3


def _exclude_self(spec) -> bool:
    # dmr_compat reproduces the released DMR code (self inside the positive mask).
    return not spec.dmr_compat if spec.dmr_compat else (spec.exclude_self is not False)


def entry_objective(spec) -> Objective | None:
    """The loss object of a gradient entry (default: away from the clean features)."""
    if spec.attack_class.family != "gradient":
        return Unscored()  # a ranking has no per-image "fooled" to score
    return objective(spec.objective or "away", margin=_margin(spec), exclude_self=_exclude_self(spec))


def _run_entry(entry: Entry, target: ReIDFeatures, surrogate: ReIDFeatures | None, data: ReIDData,
               qf: torch.Tensor, gf: torch.Tensor, options: ReIDOptions, device: torch.device,
               images: _ImageCache, *, kept: EntryProgress | UnitsProgress | None,
               snapshots: _Snapshots) -> dict[str, Any]:
    """One setting: its groups attacked (what ``kept`` holds is taken as it is), then the metrics."""
    spec = entry.spec
    generated = entry.attack.family != "gradient"  # a trained generator: no objective, no gradients
    objective_name = None if generated else (spec.objective or "away")
    source = target
    if spec.source == "surrogate":
        assert surrogate is not None  # _check_suite refuses a transfer entry without a surrogate
        source = surrogate
    split = data.query if options.perturb == "query" else data.gallery
    if objective_name == "misrank":
        groups = identity_batches(split.pids, spec.ids_per_batch or DEFAULT_IDS_PER_BATCH)
    else:
        groups = [list(range(s, min(s + options.batch_size, len(split))))
                  for s in range(0, len(split), options.batch_size)]
    attack = functools.partial(_attacked_features, entry, target, source, images, split, objective_name, generated,
                               device)
    shape = (len(split), qf.shape[1])
    if distributed.world()[1] > 1:
        adv_features, seconds = _attack_queued(entry, groups, attack, shape, kept, snapshots, options, device)
    else:
        adv_features, seconds = _attack_in_order(entry, groups, attack, shape, kept, snapshots, device)
    queries, gallery = (adv_features, gf) if options.perturb == "query" else (qf, adv_features)
    metrics = _metrics(queries, gallery, data.query, data.gallery, options, False)
    reranked = _metrics(queries, gallery, data.query, data.gallery, options, True) if options.rerank else None
    return {"attack": entry.attack.name, "label": spec.display_name(), "norm": entry.attack.norm,
            "eps": entry.attack.effective_eps(entry.eps), **metrics, "reranked": reranked,
            "params": _setting_params(entry, objective_name, generated, options), "seconds": round(seconds, 4)}


def _setting_params(entry: Entry, objective_name: str | None, generated: bool, options: ReIDOptions) -> dict[str, Any]:
    spec = entry.spec
    params = entry.params()
    params.update({"objective": objective_name or "generator", "source": "surrogate" if generated else
                   (spec.source or "target"), "perturb": options.perturb})
    if objective_name == "misrank":
        params.update({"margin": _margin(spec), "exclude_self": _exclude_self(spec),
                       "dmr_compat": bool(spec.dmr_compat),
                       "ids_per_batch": spec.ids_per_batch or DEFAULT_IDS_PER_BATCH})
    return params


def _attack_in_order(entry: Entry, groups: list[list[int]], attack: Callable[[list[int]], torch.Tensor],
                     shape: tuple[int, int], kept: EntryProgress | UnitsProgress | None, snapshots: _Snapshots,
                     device: torch.device) -> tuple[torch.Tensor, float]:
    """One process: the groups in order, after those ``kept`` holds; a snapshot after each (when due).
    The adversarial features of every row, and the seconds the setting took."""
    t0 = time.perf_counter()
    adv_features = torch.empty(*shape, device=device)
    done: list[int] = []
    earlier = 0.0
    if isinstance(kept, EntryProgress):  # the groups an interrupted run finished: their features as it computed them
        adv_features[torch.tensor(kept.rows, device=device)] = kept.features().to(device)
        done, earlier = list(kept.rows), kept.seconds
    finished_rows = set(done)
    for group in groups:
        if finished_rows.issuperset(group):
            continue
        adv_features[torch.tensor(group, device=device)] = attack(group)
        done.extend(group)
        rows = list(done)
        snapshots.group_done(EntryProgress(entry.index, entry.spec.display_name(), rows,
                                           functools.partial(_rows_of, adv_features, rows),
                                           earlier + time.perf_counter() - t0))
    return adv_features, earlier + time.perf_counter() - t0


def _attack_queued(entry: Entry, groups: list[list[int]], attack: Callable[[list[int]], torch.Tensor],
                   shape: tuple[int, int], kept: EntryProgress | UnitsProgress | None, snapshots: _Snapshots,
                   options: ReIDOptions, device: torch.device) -> tuple[torch.Tensor, float]:
    """torchrun: the groups as work units (a group is one "batch" of the plan), claimed by every process;
    rank 0 saves the units as they come. Every process gets every row and the busiest process's seconds."""

    def rows_of(start: int, stop: int) -> list[int]:
        return [row for group in groups[start:stop] for row in group]

    def compute(start: int, stop: int) -> torch.Tensor:
        return torch.cat([attack(group) for group in groups[start:stop]])

    def save(job: dict[str, Any]) -> None:
        snapshots.units_saved(UnitsProgress(entry.index, entry.spec.display_name(), job))

    resumed = kept.job if isinstance(kept, UnitsProgress) else None
    work = RowsWork(len(groups), 1, rows_of, compute, total=shape[0], dim=shape[1])
    job = work.run(device, resumed, save if snapshots.save_state else None, options.save_every)
    snapshots.outcome.count_units(job.facts)
    return job.features.to(device), job.seconds


def _attacked_features(entry: Entry, target: ReIDFeatures, source: ReIDFeatures, images: _ImageCache,
                       split: ReIDSplit, objective_name: str | None, generated: bool, device: torch.device,
                       group: list[int]) -> torch.Tensor:
    """A group attacked as one batch (on ``source``), and the target's features of the result."""
    idx = torch.tensor(group, device=device)
    x, y = _group_inputs(images, group, split, source, objective_name, generated, device)
    x_adv = entry(source, x, y, idx, batch_size=len(group)).x_adv
    with torch.no_grad():
        return target(x_adv).float()


def _group_inputs(images: _ImageCache, group: list[int], split: ReIDSplit, source: ReIDFeatures,
                  objective_name: str | None, generated: bool, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A group's images and what its attack moves away from: identities (mis-ranking, generators) or
    the source model's clean features."""
    x = images.batch(group).to(device)
    if objective_name == "misrank" or generated:
        return x, torch.from_numpy(split.pids[group]).to(device)
    with torch.no_grad():
        return x, source(x).float()


def _rows_of(features: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return features[torch.tensor(rows, device=features.device)]
