"""The evaluation loop: one clean pass and every suite entry, batch by batch."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from robench.attacks import ATTACKS, Attack
from robench.attacks.torchattacks_adapter import PREFIX as TA_PREFIX
from robench.attacks.torchattacks_adapter import TorchattacksAttack
from robench.data.sources import ImageDataset, TensorImages
from robench.errors import RunError, UsageError
from robench.metrics import Accuracy, Collected
from robench.models.wrapper import RobustModel, evaluation_mode
from robench.precision import PrecisionModel, matmul_precision
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


def iterate_batches(dataset: ImageDataset, batch_size: int, workers: int, pin: bool) -> Iterator:
    """In-memory data is sliced directly; other datasets go through a DataLoader."""
    if isinstance(dataset.base, TensorImages):
        base = dataset.base
        for start in range(0, len(dataset), batch_size):
            idx = torch.from_numpy(dataset.indices[start:start + batch_size])
            yield base.x[idx], base.y[idx], idx
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
) -> RunOutcome:
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
    with evaluation_mode(model), matmul_precision(precision):
        # eval() on the outer wrapper too: torchattacks restores the mode it finds.
        forward = PrecisionModel(model, precision, device).eval()
        for x, y, idx in iterate_batches(dataset, batch_size, workers, device.type == "cuda"):
            for d, part in zip(digests, (idx.numpy().astype(np.int64), y.numpy().astype(np.int64),
                                         x.numpy().astype(np.float32))):
                d.update(part.tobytes())
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
            nonfinite += int((~finite).sum())
            pred = logits.argmax(dim=1)
            correct = (pred == y) & finite
            clean.update(correct)
            idx_parts.update(idx)
            y_parts.update(y)
            pred_parts.update(pred)
            worst = correct.clone()
            attacked = torch.nonzero(correct).squeeze(1)
            for entry in entries:
                robust = _attack_batch(entry, forward, x, y, idx.to(device), correct, attacked, device)
                worst &= robust
            robust_all.update(worst)
            if on_batch:
                on_batch(len(y))
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
    )


def _attack_batch(entry: Entry, forward, x, y, idx, correct, attacked, device) -> torch.Tensor:
    """Attack the clean-correct samples; misclassified ones are already not robust."""
    robust = correct.clone()
    if attacked.numel():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            result = entry.attack(forward, x[attacked], y[attacked], idx[attacked])
        except (UsageError, RunError):
            raise
        except torch.cuda.OutOfMemoryError as exc:
            raise RunError(f"{entry.spec.display_name()}: out of GPU memory; lower --batch-size") from exc
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            entry.peak_memory = max(entry.peak_memory or 0, peak)
        entry.seconds += time.perf_counter() - t0
        entry.gradient_evals += result.gradient_evals
        robust[attacked] = ~result.success
        entry.fooled.update(result.success)
    entry.accuracy.update(robust)
    entry.robust.update(robust)
    return robust
