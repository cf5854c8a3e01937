"""The pixel-change paper's experiments on a set of 8-bit images, batched on the device.

Experiment 1 (Table 6): new random values anywhere in [0,255], positions anywhere.
Experiment 2 (Table 7): values within +/-delta of the old value.
Experiment 3 (Table 8): positions inside a centred rectangle.
Experiment 4 (Table 9): the same changes applied to adversarial examples
(FGSM), counting how many return to the correct class.

Only images the model classifies correctly before any change take part, as
in the paper. Every (setting, pixel count, trial) is one pass of batched
forward calls; each setting has its own random stream, so adding a setting
does not change the draws of the others.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch

from robench.attacks import FGSM, randomness
from robench.errors import UsageError
from robench.models.wrapper import RobustModel, evaluation_mode
from robench.pixels.perturb import area_box, pixel_trials

_KIND_CODE = {"range": 0, "delta": 1, "area": 2, "attack": 3}
PIXEL_PROGRESS_FORMAT = "robench.pixel-progress/1"  # the snapshots of ``run_pixel_experiments``


@dataclass(frozen=True)
class PixelSetting:
    experiment: str  # range | delta | area
    label: str
    delta: int | None = None
    area: tuple[int, int] | None = None

    def stream(self, seed: int, n_pixels: int) -> int:
        param = self.delta if self.delta is not None else (self.area[0] * 100_003 + self.area[1] if self.area else 0)
        return randomness.stream_key(seed, _KIND_CODE[self.experiment], param, n_pixels)


def build_settings(deltas: list[int], areas: list[tuple[int, int]]) -> list[PixelSetting]:
    """Experiment 1 always; one setting per delta (experiment 2) and per area (experiment 3)."""
    settings = [PixelSetting("range", "0-255")]
    settings += [PixelSetting("delta", f"±{d}", delta=d) for d in deltas]
    settings += [PixelSetting("area", f"{h}x{w}", area=(h, w)) for h, w in areas]
    return settings


@dataclass
class PixelCounts:
    """Misclassification counts per setting and pixel count, one number per trial."""

    evaluated: int = 0
    clean_total: int = 0
    clean_correct: int = 0
    counts: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    adversarial: int = 0
    adversarial_counts: dict[int, torch.Tensor] = field(default_factory=dict)
    fingerprint: str = ""
    seconds: float = 0.0
    forward_images: int = 0  # images passed through the model, all passes together
    batches: int = 0  # finished batches these counts hold
    data_digest: str = ""  # of those batches' images and labels: a resume checks it

    def merged(self, batch: "PixelCounts", data_digest: str) -> "PixelCounts":
        """New counts: these and one more finished batch's. The run swaps them in with one assignment,
        so an interruption never leaves a batch half counted."""
        return replace(self.plus(batch), batches=self.batches + 1, data_digest=data_digest)

    def plus(self, other: "PixelCounts") -> "PixelCounts":
        """New counts: these and those of other images (a work unit's, ``robench.pixels.queued``). The
        totals add up; the time, the fingerprint and the digest are the caller's to set."""
        counts, adversarial_counts = dict(self.counts), dict(self.adversarial_counts)
        for key, trials in other.counts.items():
            _add(counts, key, trials)
        for n, trials in other.adversarial_counts.items():
            _add(adversarial_counts, n, trials)
        return replace(self, evaluated=self.evaluated + other.evaluated,
                       clean_total=self.clean_total + other.clean_total,
                       clean_correct=self.clean_correct + other.clean_correct, counts=counts,
                       adversarial=self.adversarial + other.adversarial, adversarial_counts=adversarial_counts,
                       forward_images=self.forward_images + other.forward_images,
                       batches=self.batches + other.batches)

    def snapshot(self, batch_size: int) -> dict[str, Any]:
        """The finished batches' counts as plain numbers, strings and tensors, which
        ``torch.load(weights_only=True)`` reads back; the per-setting table becomes
        ``[setting index, pixels, per-trial counts]`` rows (no tuple keys)."""
        return {"format": PIXEL_PROGRESS_FORMAT, "batches": self.batches, "batch_size": batch_size,
                "data_digest": self.data_digest, "evaluated": self.evaluated, "clean_total": self.clean_total,
                "clean_correct": self.clean_correct, "adversarial": self.adversarial,
                "forward_images": self.forward_images, "seconds": self.seconds,
                "counts": [[si, n, trials] for (si, n), trials in self.counts.items()],
                "adversarial_counts": [[n, trials] for n, trials in self.adversarial_counts.items()]}

    @classmethod
    def restored(cls, snapshot: dict[str, Any], batch_size: int) -> "PixelCounts":
        """The counts of a snapshot taken with the same batch size."""
        if not isinstance(snapshot, dict) or snapshot.get("format") != PIXEL_PROGRESS_FORMAT:
            raise UsageError("cannot resume: the progress file is not that of a robench Pixel-index run")
        if snapshot["batch_size"] != batch_size:
            raise UsageError(f"cannot resume: the run used --batch-size {snapshot['batch_size']}, not {batch_size}")
        return cls(evaluated=snapshot["evaluated"], clean_total=snapshot["clean_total"],
                   clean_correct=snapshot["clean_correct"], adversarial=snapshot["adversarial"],
                   seconds=snapshot["seconds"], forward_images=snapshot["forward_images"],
                   batches=snapshot["batches"], data_digest=snapshot["data_digest"],
                   counts={(si, n): trials for si, n, trials in snapshot["counts"]},
                   adversarial_counts={n: trials for n, trials in snapshot["adversarial_counts"]})


class PixelExperimentsInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during the experiments; ``counts`` holds the batches that finished."""

    def __init__(self, counts: PixelCounts) -> None:
        super().__init__("the pixel experiments were interrupted")
        self.counts = counts


def _finished_before(seen: int, done: int, digest: "_DataDigest", resumed_digest: str | None) -> bool:
    """Batch ``seen`` was finished before the interruption: only the digests need its images, and once
    they cover every finished batch they must equal the interrupted run's."""
    if seen == done and digest.data() != resumed_digest:
        raise _images_changed(done)
    return seen <= done


def run_pixel_experiments(model: RobustModel, images: torch.Tensor, labels: torch.Tensor | None, *, pixels: list[int],
                          settings: list[PixelSetting], trials: int = 1, seed: int = 0, shared_positions: bool = False,
                          channels: str = "all", attack_eps: float | None = None, batch_size: int = 256,
                          device: torch.device = torch.device("cpu"), on_batch: Callable[[int], None] | None = None,
                          resume_state: dict[str, Any] | None = None,
                          save_state: Callable[[dict[str, Any]], None] | None = None,
                          save_every: float = 2.0, first: int = 0) -> PixelCounts:
    """``images``: uint8 NCHW at the model's input size; ``labels`` None means "the clean prediction";
    ``first``: the folder position of ``images[0]`` (a work unit's start: the draws' key is the position).

    ``save_state`` receives a snapshot (``PixelCounts.snapshot``) after a batch at most every
    ``save_every`` seconds, after the last batch and when the run stops; ``resume_state`` (such
    a snapshot) skips the batches it holds, once their images are found unchanged. Draws are
    keyed by image position, so a resumed run counts exactly what an uninterrupted one does.
    Ctrl-C raises ``PixelExperimentsInterrupted`` with the finished batches' counts.
    """
    _check_inputs(images, pixels, settings, trials)
    started = time.perf_counter()
    out = PixelCounts.restored(resume_state, batch_size) if resume_state is not None else PixelCounts()
    done, earlier = out.batches, out.seconds  # finished, and the time they took, before an interruption
    batch = _BatchExperiments(model, pixels, settings, trials, seed, attack_eps, device,
                              {"shared_positions": shared_positions, "channels": channels})
    digest = _DataDigest()
    resumed_digest = None if resume_state is None else resume_state["data_digest"]  # of the batches done
    seen, last_save = 0, time.perf_counter()  # seen: batches read, finished ones included

    def snapshot() -> dict[str, Any]:
        out.seconds = earlier + time.perf_counter() - started
        return out.snapshot(batch_size)

    model.to(device)
    with evaluation_mode(model), torch.no_grad():
        try:
            for start in range(0, len(images), batch_size):
                x, y = images[start:start + batch_size], None if labels is None else labels[start:start + batch_size]
                digest.add(x, y)
                seen += 1
                if _finished_before(seen, done, digest, resumed_digest):
                    continue
                out = out.merged(batch.run(x, y, first + start), digest.data())
                if on_batch:
                    on_batch(len(x))
                if save_state and time.perf_counter() - last_save >= save_every:
                    save_state(snapshot())
                    last_save = time.perf_counter()
            if seen < done:  # fewer batches than the interrupted run finished
                raise _images_changed(done)
        except BaseException as exc:
            # Interrupted or failed: the finished batches stay for --resume.
            if save_state and out.batches > done:
                save_state(snapshot())
            if isinstance(exc, KeyboardInterrupt):
                out.seconds = earlier + time.perf_counter() - started
                raise PixelExperimentsInterrupted(out) from exc
            raise
    if save_state:
        save_state(snapshot())
    out.fingerprint = digest.images.hexdigest()
    out.seconds = earlier + time.perf_counter() - started
    return out


def _check_inputs(images: torch.Tensor, pixels: list[int], settings: list[PixelSetting], trials: int) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise UsageError("pixel experiments need 8-bit images (uint8 NCHW)")
    if trials < 1:
        raise UsageError(f"--trials must be >= 1, got {trials}")
    _, _, h, w = images.shape
    for s in settings:
        _, _, rows, cols = area_box(h, w, s.area)
        if max(pixels) > rows * cols:
            raise UsageError(f"{max(pixels)} pixels do not fit in the {s.label} area of a {h}x{w} input")


def _images_changed(done: int) -> UsageError:
    return UsageError(f"cannot resume: the images changed since the interrupted run (its first {done} batch(es) "
                      "differ); start a new run with another --out")


def data_digest(images: torch.Tensor, labels: torch.Tensor | None, batch_size: int) -> str:
    """The ``data_digest`` that counts of these images (a run's, a work unit's) hold."""
    return _DataDigest.of(images, labels, batch_size).data()


def images_fingerprint(images: torch.Tensor, batch_size: int) -> str:
    """The ``fingerprint`` of a whole run on these images."""
    return _DataDigest.of(images, None, batch_size).images.hexdigest()


class _DataDigest:
    """SHA-256 of the images (the folder's fingerprint) and of their labels, fed batch by batch."""

    def __init__(self) -> None:
        self.images = hashlib.sha256()
        self.labels = hashlib.sha256()

    def add(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        self.images.update(x.numpy().tobytes())
        if y is not None:
            self.labels.update(y.cpu().numpy().astype(np.int64).tobytes())

    def data(self) -> str:
        """Both, for the batches added so far (``digest()`` leaves the streams open for more)."""
        return hashlib.sha256(self.images.digest() + self.labels.digest()).hexdigest()

    @classmethod
    def of(cls, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int) -> "_DataDigest":
        """Fed batch by batch, as a run feeds it: the same digest, never a copy of every image at once."""
        digest = cls()
        for start in range(0, len(images), batch_size):
            digest.add(images[start:start + batch_size], None if labels is None else labels[start:start + batch_size])
        return digest


@dataclass
class _BatchExperiments:
    """Every experiment on one batch of images, added to the run's counts."""

    model: RobustModel
    pixels: list[int]
    settings: list[PixelSetting]
    trials: int
    seed: int
    attack_eps: float | None
    device: torch.device
    change: dict[str, Any]

    def run(self, images: torch.Tensor, labels: torch.Tensor | None, start: int) -> PixelCounts:
        """The batch's counts, apart from the run's: an interruption inside a batch leaves nothing half-counted."""
        model, trials, out = self.model, self.trials, PixelCounts()
        ids = torch.arange(start, start + len(images), device=self.device)  # the draws' key: position in the folder
        x = images.to(self.device).float().div_(255.0)
        pred = model(x).argmax(dim=1)
        out.forward_images += len(x)
        ref = pred if labels is None else labels.to(self.device)
        keep = pred == ref
        out.clean_total += len(x)
        out.clean_correct += int(keep.sum())
        x, ref, ids = x[keep], ref[keep], ids[keep]
        out.evaluated += len(x)
        if not len(x):
            return out
        for si, s in enumerate(self.settings):
            for n in self.pixels:
                fooled = pixel_trials(model, x, ref, ids, n_pixels=n, trials=trials, key=s.stream(self.seed, n),
                                      delta=s.delta, area=s.area, **self.change)
                _add(out.counts, (si, n), fooled.sum(dim=1).cpu())
                out.forward_images += trials * len(x)
        if self.attack_eps is not None:
            _attack_experiment(model, x, ref, ids, out, self.pixels, trials, self.seed, self.attack_eps, self.change)
        return out


def _attack_experiment(model, x, ref, ids, out: PixelCounts, pixels, trials, seed, eps, change) -> None:
    """Table 9: adversarial examples (saved as 8-bit images), then random pixel changes."""
    with torch.enable_grad():
        x_adv = FGSM(final_iterate=True)(model, x, ref, eps).x_adv
    x_adv = torch.round(x_adv * 255.0) / 255.0  # an adversarial *image*: quantised like any other
    still = model(x_adv).argmax(dim=1) != ref
    out.forward_images += len(x) * 2
    x_adv, ref, ids = x_adv[still], ref[still], ids[still]
    out.adversarial += len(x_adv)
    if not len(x_adv):
        return
    setting = PixelSetting("attack", "fgsm")
    for n in pixels:
        fooled = pixel_trials(model, x_adv, ref, ids, n_pixels=n, trials=trials, key=setting.stream(seed, n), **change)
        _add(out.adversarial_counts, n, fooled.sum(dim=1).cpu())
        out.forward_images += trials * len(x_adv)


def _add(table: dict, key: Any, value: torch.Tensor) -> None:
    table[key] = table[key] + value if key in table else value
