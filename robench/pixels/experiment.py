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
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from robench.attacks import FGSM, randomness
from robench.errors import UsageError
from robench.models.wrapper import RobustModel, evaluation_mode
from robench.pixels.perturb import pixel_trials
from robench.pixels.index import pixel_index_terms
from robench.pixels.perturb import area_box, value_range

_KIND_CODE = {"range": 0, "delta": 1, "area": 2, "attack": 3}


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


def run_pixel_experiments(
    model: RobustModel,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    pixels: list[int],
    settings: list[PixelSetting],
    trials: int = 1,
    seed: int = 0,
    shared_positions: bool = False,
    channels: str = "all",
    attack_eps: float | None = None,
    batch_size: int = 256,
    device: torch.device = torch.device("cpu"),
    on_batch: Callable[[int], None] | None = None,
) -> PixelCounts:
    """``images``: uint8 NCHW at the model's input size; ``labels`` None means "the clean prediction"."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise UsageError("pixel experiments need 8-bit images (uint8 NCHW)")
    if trials < 1:
        raise UsageError(f"--trials must be >= 1, got {trials}")
    _, _, h, w = images.shape
    for s in settings:
        _, _, rows, cols = area_box(h, w, s.area)
        if max(pixels) > rows * cols:
            raise UsageError(f"{max(pixels)} pixels do not fit in the {s.label} area of a {h}x{w} input")
    started = time.perf_counter()
    out = PixelCounts()
    digest = hashlib.sha256()
    change = {"shared_positions": shared_positions, "channels": channels}
    model.to(device)
    with evaluation_mode(model), torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = images[start:start + batch_size]
            digest.update(x.numpy().tobytes())
            ids = torch.arange(start, start + len(x), device=device)
            x = x.to(device).float().div_(255.0)
            pred = model(x).argmax(dim=1)
            out.forward_images += len(x)
            ref = pred if labels is None else labels[start:start + len(x)].to(device)
            keep = pred == ref
            out.clean_total += len(x)
            out.clean_correct += int(keep.sum())
            x, ref, ids = x[keep], ref[keep], ids[keep]
            out.evaluated += len(x)
            if len(x):
                for si, s in enumerate(settings):
                    for n in pixels:
                        fooled = pixel_trials(model, x, ref, ids, n_pixels=n, trials=trials,
                                              key=s.stream(seed, n), delta=s.delta, area=s.area, **change)
                        _add(out.counts, (si, n), fooled.sum(dim=1).cpu())
                        out.forward_images += trials * len(x)
                if attack_eps is not None:
                    _attack_experiment(model, x, ref, ids, out, pixels, trials, seed, attack_eps, change)
            if on_batch:
                on_batch(len(images[start:start + batch_size]))
    out.fingerprint = digest.hexdigest()
    out.seconds = time.perf_counter() - started
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


def experiments_document(counts: PixelCounts, settings: list[PixelSetting], pixels: list[int],
                         image_hw: tuple[int, int], attack_eps: float | None) -> list[dict[str, Any]]:
    """One object per setting: per pixel count, misclassified (mean over trials), w, p, r, a, pi."""
    h, w = image_hw
    total = counts.evaluated
    experiments = []
    for si, s in enumerate(settings):
        rows = []
        vr = value_range(s.delta)
        area_pixels = s.area[0] * s.area[1] if s.area else None
        for n in pixels:
            per_trial = counts.counts.get((si, n), torch.zeros(1))
            mean = float(per_trial.float().mean())
            rows.append({
                "pixels": n,
                "misclassified": mean,
                "misclassified_trials": [int(v) for v in per_trial],
                "misclassified_std": float(per_trial.float().std()) if len(per_trial) > 1 else 0.0,
                "total": total,
                "recognition_rate": 1.0 - mean / total,
                **pixel_index_terms(mean, total, n, h * w, vr, area_pixels),
            })
        experiments.append({"experiment": s.experiment, "setting": s.label, "delta": s.delta,
                            "area": list(s.area) if s.area else None, "value_range": vr, "results": rows})
    if attack_eps is not None:
        rows = []
        for n in pixels:
            per_trial = counts.adversarial_counts.get(n, torch.zeros(1))
            mean = float(per_trial.float().mean())
            adv = counts.adversarial
            rows.append({
                "pixels": n,
                "misclassified": mean,  # still fooled after the change
                "misclassified_trials": [int(v) for v in per_trial],
                "misclassified_std": float(per_trial.float().std()) if len(per_trial) > 1 else 0.0,
                "total": adv,
                "recognition_rate": 1.0 - mean / adv if adv else None,  # returned to the correct class
            })
        experiments.append({"experiment": "attack", "setting": "fgsm", "attack": "fgsm", "eps": attack_eps,
                            "adversarial": counts.adversarial, "results": rows})
    return experiments
