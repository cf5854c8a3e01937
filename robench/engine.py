"""The evaluation loop: one clean pass and every suite entry, batch by batch."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from robench.attacks import ATTACKS, Attack, AttackResult
from robench.attacks.torchattacks_adapter import PREFIX as TA_PREFIX
from robench.attacks.torchattacks_adapter import TorchattacksAttack
from robench.data.sources import ImageDataset, TensorImages, as_float
from robench.errors import RunError, UsageError
from robench.metrics import Accuracy, Collected
from robench.models.wrapper import RobustModel, evaluation_mode
from robench.precision import PrecisionModel, matmul_precision
from robench.sanity import first_batch_checks
from robench.speed import estimated_work, finish, should_compile, speed_up, timed_first_call
from robench.suites import AttackSpec, Suite
from robench.suites.schema import REID_FIELDS


@dataclass
class Entry:
    """One (attack, eps) cell of the suite: one result row."""

    spec: AttackSpec
    index: int  # position among all entries: keys the random stream
    eps: float | None  # None for attacks without a budget (e.g. ta.CW)
    eps_text: str
    attack: Attack
    accuracy: Accuracy = field(default_factory=Accuracy)
    fooled: Accuracy = field(default_factory=Accuracy)  # success among attacked samples
    robust: Collected = field(default_factory=Collected)
    seconds: float = 0.0
    gradient_evals: int = 0
    peak_memory: int | None = None
    chunk: int | None = None  # set when out-of-memory forced smaller attack chunks

    def params(self) -> dict:
        info = {"eps_expr": self.eps_text if self.eps is not None else None, "final_iterate": self.attack.final_iterate, **self.attack.describe()}
        return info


def build_entries(suite: Suite, model: RobustModel, seed: int) -> list[Entry]:
    entries: list[Entry] = []
    std = model.pixel_std() if suite.eps_space == "normalized" else None
    if std is not None and model.normalization is None:
        raise UsageError(
            f"suite {suite.name} gives eps in normalised units: the model needs --normalize or --mean/--std"
        )
    for spec in suite.attacks:
        if spec.attack == "pixels":
            for count in spec.pixel_counts():
                entries.append(_pixel_entry(spec, len(entries), count, seed))
            continue
        eps_list = spec.eps or [None]
        texts = spec.eps_text or [""]
        for eps, text in zip(eps_list, texts):
            entries.append(_entry(spec, len(entries), eps, text, std, seed))
    return entries


def _entry(spec: AttackSpec, index: int, eps: float | None, text: str, std, seed: int) -> Entry:
    def to_pixels(value: float):
        # An L-inf ball of radius r in z-score space is a box of radius r*std_c in pixels.
        return value * std.detach().cpu() if std is not None else value

    common = {"seed": seed, "stream": index}
    if spec.attack.startswith(TA_PREFIX):
        attack: Attack = TorchattacksAttack(
            spec.attack[len(TA_PREFIX):], None if eps is None else to_pixels(eps),
            norm=spec.norm, params=spec.params, **common,
        )
    elif spec.attack == "dmr":
        attack = ATTACKS.get("dmr")(None if eps is None else to_pixels(eps), generator=spec.generator, **common)
    else:
        cls = ATTACKS.get(spec.attack)
        kwargs = {"norm": spec.norm, "final_iterate": spec.final_iterate, **common}
        if spec.attack != "fgsm":
            kwargs["steps"] = spec.resolved_steps()
            kwargs["step_size"] = to_pixels(spec.step_size_for(eps))
        if spec.random_start is not None:
            rs = spec.random_start
            kwargs["random_start"] = rs if isinstance(rs, bool) else to_pixels(float(rs))
        if spec.restarts is not None:
            kwargs["restarts"] = spec.restarts
        if spec.decay is not None:
            kwargs["decay"] = spec.decay
        attack = cls(to_pixels(eps), **kwargs)
    return Entry(spec, index, eps, text, attack)


def _pixel_entry(spec: AttackSpec, index: int, count: int, seed: int) -> Entry:
    cls = ATTACKS.get("pixels")
    attack = cls(n_pixels=count, delta=spec.delta, area=spec.area, shared_positions=bool(spec.shared_positions),
                 channels=spec.channels or "all", trials=spec.trials or 1, seed=seed, stream=index)
    return Entry(spec, index, None, f"{count}px", attack)


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
    *,
    device: torch.device,
    batch_size: int = 256,
    precision: str = "fp32",
    seed: int = 0,
    workers: int = 0,
    on_batch: Callable[[int], None] | None = None,
    resume_state: dict | None = None,
    save_state: Callable[[dict], None] | None = None,
    save_every: float = 10.0,
    compile: str = "off",
    compile_backend: str = "inductor",
    channels_last: bool = False,
    sweep_reuse: bool = False,
) -> RunOutcome:
    """Evaluate every entry of ``suite``, batch by batch.

    ``save_state`` receives a snapshot of the finished batches at most every
    ``save_every`` seconds, after the last batch and when the run is
    interrupted; ``resume_state`` (such a snapshot) skips the batches it
    holds. Randomness is keyed by sample index, so a resumed run equals an
    uninterrupted one.
    """
    if len(dataset) == 0:
        raise UsageError("the dataset is empty")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    reid_only = [s.display_name() for s in suite.attacks
                 if any(getattr(s, f) is not None for f in REID_FIELDS)]
    if suite.task == "reid" or reid_only:
        raise UsageError(f"suite {suite.name} is for re-identification models "
                         f"({', '.join(reid_only) or 'task: reid'}); evaluate it on market1501:, dukemtmc: "
                         "or reid: data")
    started = time.perf_counter()
    model.to(device)
    entries = build_entries(suite, model, seed)
    clean = Accuracy()
    idx_parts, y_parts, pred_parts = Collected(), Collected(), Collected()
    robust_all = Collected()
    # One stream per field, joined at the end: the fingerprint does not depend on batch size.
    digests = [hashlib.sha256() for _ in range(3)]
    labels_known = dataset_labels(dataset)
    num_classes = -1
    nonfinite = 0
    done = 0
    if resume_state is not None:
        done, num_classes, nonfinite = _restore(resume_state, batch_size, clean, entries, idx_parts, y_parts,
                                                pred_parts, robust_all)
    last_save = time.perf_counter()

    def snapshot(batches: int) -> dict:
        return _snapshot(batches, batch_size, num_classes, nonfinite, clean, entries, idx_parts, y_parts,
                         pred_parts, robust_all)

    finished = done
    sanity: dict = {"model_was_training": any(m.training for m in model.model.modules())}
    with evaluation_mode(model), matmul_precision(precision):
        # eval() on the outer wrapper too: torchattacks restores the mode it finds.
        forward = PrecisionModel(model, precision, device).eval()
        compiled = should_compile(compile, device, estimated_work(len(dataset), suite))
        forward, speed = speed_up(forward, compile=compiled, backend=compile_backend, channels_last=channels_last)
        try:
            for b, (x, y, idx) in enumerate(iterate_batches(dataset, batch_size, workers, device.type == "cuda")):
                for d, part in zip(digests, (idx.numpy().astype(np.int64), y.numpy().astype(np.int64),
                                             x.numpy().astype(np.float32))):
                    d.update(part.tobytes())
                if b < done:
                    continue  # finished before the interruption: only the fingerprint needs its data
                if b == done:
                    timed_first_call(forward, x.to(device).float(), speed)
                num_classes, nonfinite = _run_batch(x, y, idx, forward, entries, device, clean, idx_parts, y_parts,
                                                    pred_parts, robust_all, num_classes, nonfinite, labels_known,
                                                    dataset, sanity if b == done else None, sweep_reuse)
                finished = b + 1
                if on_batch:
                    on_batch(len(y))
                if save_state and time.perf_counter() - last_save >= save_every:
                    save_state(snapshot(finished))
                    last_save = time.perf_counter()
        except BaseException as exc:
            # Interrupted (Ctrl-C, SIGTERM) or failed: keep every finished batch for --resume.
            if save_state and finished > done:
                save_state(snapshot(finished))
            if isinstance(exc, KeyboardInterrupt):
                partial = RunOutcome(clean.total, clean, entries, idx_parts.compute().numpy(),
                                     y_parts.compute().numpy(), pred_parts.compute().numpy(),
                                     robust_all.compute().numpy().astype(bool) if entries else None, "",
                                     num_classes, time.perf_counter() - started, nonfinite, complete=False,
                                     total=len(dataset), sanity=sanity)
                raise RunInterrupted(partial) from exc
            raise
    if save_state:
        save_state(snapshot(finished))
    finish(speed)
    return RunOutcome(
        n=clean.total,
        clean=clean,
        entries=entries,
        sample_index=idx_parts.compute().numpy(),
        labels=y_parts.compute().numpy(),
        clean_pred=pred_parts.compute().numpy(),
        robust_all=robust_all.compute().numpy().astype(bool) if entries else None,
        fingerprint=hashlib.sha256(b"".join(d.digest() for d in digests)).hexdigest(),
        num_classes=num_classes,
        seconds=time.perf_counter() - started,
        nonfinite_logits=nonfinite,
        total=len(dataset),
        sanity=sanity,
        speed={**speed.as_dict(), "sweep_reuse": sweep_reuse},
    )


def dataset_fingerprint(dataset: ImageDataset, batch_size: int, workers: int = 0) -> str:
    """The same fingerprint ``run`` computes, without a model (distributed runs need the whole set's)."""
    digests = [hashlib.sha256() for _ in range(3)]
    for x, y, idx in iterate_batches(dataset, batch_size, workers, False):
        for d, part in zip(digests, (idx.numpy().astype(np.int64), y.numpy().astype(np.int64),
                                     x.numpy().astype(np.float32))):
            d.update(part.tobytes())
    return hashlib.sha256(b"".join(d.digest() for d in digests)).hexdigest()


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
    )


class RunInterrupted(Exception):
    """Ctrl-C or SIGTERM during a run: ``outcome`` holds the finished batches (complete=False)."""

    def __init__(self, outcome: "RunOutcome") -> None:
        super().__init__("the run was interrupted")
        self.outcome = outcome


def _run_batch(x, y, idx, forward, entries, device, clean, idx_parts, y_parts, pred_parts, robust_all,
               num_classes, nonfinite, labels_known, dataset, sanity: dict | None = None,
               sweep_reuse: bool = False) -> tuple[int, int]:
    """Clean pass and every entry on one batch; returns the (possibly learned) class count and NaN count.

    ``sanity``, when given, receives the first-batch checks of :mod:`robench.sanity`. With
    ``sweep_reuse``, an any-iterate attack listed with increasing eps attacks at each eps only
    the samples it has not fooled at the previous one.
    """
    x = x.to(device, non_blocking=True).float()
    y = y.to(device, non_blocking=True).long()
    with torch.no_grad():
        logits = forward(x)
    if num_classes < 0:
        num_classes = logits.shape[1]
        if labels_known is not None:
            check_labels(labels_known, num_classes, dataset.indices)
    check_labels(y.cpu().numpy(), num_classes, idx.numpy())
    finite = torch.isfinite(logits).all(dim=1)
    if sanity is not None:
        sanity.update(first_batch_checks(forward, x, y, logits))
    # A row with NaN/inf logits has no prediction (-1): it is never correct.
    pred = torch.where(finite, logits.argmax(dim=1), torch.full_like(y, -1))
    correct = pred == y
    attacked = torch.nonzero(correct).squeeze(1)
    outcomes = []
    fooled_before: dict[int, tuple[float, torch.Tensor]] = {}  # per suite entry: (eps, fooled at that eps)
    for entry in entries:
        targets = attacked
        prior = fooled_before.get(id(entry.spec)) if sweep_reuse and _reusable(entry) else None
        if prior is not None and entry.eps >= prior[0]:
            # Fooled at a smaller eps of the same attack: that example lies in this larger ball too.
            targets = attacked[~prior[1][attacked]]
        robust, success, seconds, grad_evals, peak = _attack_batch(entry, forward, x, y, idx.to(device), correct,
                                                                   targets, device)
        if prior is not None and entry.eps >= prior[0]:
            robust &= ~prior[1]
            success = ~robust[attacked]
        if _reusable(entry):
            fooled_before[id(entry.spec)] = (entry.eps, correct & ~robust)
        outcomes.append((robust, success, seconds, grad_evals, peak))
    # Commit the whole batch at once: an interruption leaves the accumulators at a batch boundary.
    clean.update(correct)
    idx_parts.update(idx)
    y_parts.update(y)
    pred_parts.update(pred)
    worst = correct.clone()
    for entry, (robust, success, seconds, grad_evals, peak) in zip(entries, outcomes):
        entry.accuracy.update(robust)
        entry.robust.update(robust)
        if success is not None:
            entry.fooled.update(success)
        entry.seconds += seconds
        entry.gradient_evals += grad_evals
        if peak is not None:
            entry.peak_memory = max(entry.peak_memory or 0, peak)
        worst &= robust
    robust_all.update(worst)
    return num_classes, nonfinite + int((~finite).sum())


def _reusable(entry: Entry) -> bool:
    """Sweep reuse needs any-iterate semantics (a fooled example stays valid) and a scalar eps."""
    return (entry.eps is not None and not entry.attack.final_iterate and entry.spec.attack in
            ("fgsm", "bim", "pgd", "mifgsm") and not isinstance(entry.attack.eps, torch.Tensor))


def _attack_with_backoff(entry: Entry, forward, x, y, idx, device) -> AttackResult:
    """Attack in chunks, halving the chunk on out-of-memory and retrying it.

    Results do not change: every sample's randomness is keyed by its index,
    not by the chunk it lands in. The smallest chunk used is recorded.
    """
    size = entry.chunk or len(x)
    parts: list[AttackResult] = []
    start = 0
    while start < len(x):
        stop = min(start + size, len(x))
        try:
            parts.append(entry.attack(forward, x[start:stop], y[start:stop], idx[start:stop]))
        except torch.cuda.OutOfMemoryError as exc:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if size == 1:
                raise RunError(f"{entry.spec.display_name()}: out of memory even for one image") from exc
            size = max(1, size // 2)
            entry.chunk = size
            continue
        start = stop
    if len(parts) == 1:
        return parts[0]
    return AttackResult(torch.cat([p.x_adv for p in parts]), torch.cat([p.success for p in parts]),
                        sum(p.gradient_evals for p in parts), sum(p.forward_evals for p in parts))


def _snapshot(batches: int, batch_size: int, num_classes: int, nonfinite: int, clean: Accuracy,
              entries: list[Entry], idx_parts: Collected, y_parts: Collected, pred_parts: Collected,
              robust_all: Collected) -> dict:
    """Everything the finished batches produced, as plain tensors and numbers (torch.save-able)."""
    return {
        "format": "robench.progress/1", "batches": batches, "batch_size": batch_size, "num_classes": num_classes,
        "nonfinite": nonfinite, "clean": [clean.correct, clean.total],
        "index": idx_parts.compute(), "labels": y_parts.compute(), "pred": pred_parts.compute(),
        "robust_all": robust_all.compute(),
        "entries": [{"accuracy": [e.accuracy.correct, e.accuracy.total], "fooled": [e.fooled.correct, e.fooled.total],
                     "robust": e.robust.compute(), "seconds": e.seconds, "gradient_evals": e.gradient_evals,
                     "peak_memory": e.peak_memory, "chunk": e.chunk} for e in entries],
    }


def _restore(state: dict, batch_size: int, clean: Accuracy, entries: list[Entry], idx_parts: Collected,
             y_parts: Collected, pred_parts: Collected, robust_all: Collected) -> tuple[int, int, int]:
    if state.get("format") != "robench.progress/1":
        raise UsageError("cannot resume: the progress file is not robench's")
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
    return state["batches"], state["num_classes"], state["nonfinite"]


def _attack_batch(entry: Entry, forward, x, y, idx, correct, attacked, device):
    """Attack the clean-correct samples (misclassified ones are already not robust).

    Returns (robust flags, success among the attacked or None, seconds, gradient evaluations, peak memory).
    """
    robust = correct.clone()
    if not attacked.numel():
        return robust, None, 0.0, 0, None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = _attack_with_backoff(entry, forward, x[attacked], y[attacked], idx[attacked], device)
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    robust[attacked] = ~result.success
    return robust, result.success, time.perf_counter() - t0, result.gradient_evals, peak
