"""Normalisation presets: preprocessing travels with the model, never with the attack."""

from __future__ import annotations

import math
from dataclasses import dataclass

from robench.errors import UsageError
from robench.registry import Registry


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def as_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


PRESETS: Registry[Normalization] = Registry("normalisation preset")
PRESETS.add("none", Normalization((0.0,), (1.0,)))
PRESETS.add("imagenet", Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
# CIFAR statistics over the training set, per channel, population std.
PRESETS.add("cifar10", Normalization((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)))
PRESETS.add("cifar100", Normalization((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)))
PRESETS.add("mnist", Normalization((0.1307,), (0.3081,)))
PRESETS.add("fashion-mnist", Normalization((0.2860,), (0.3530,)))


def _parse_floats(text: str, what: str) -> tuple[float, ...]:
    from robench.expressions import eval_expr

    parts = [p for p in text.replace(" ", ",").split(",") if p]
    if not parts:
        raise UsageError(f"--{what} needs one value or one per channel")
    return tuple(eval_expr(p) for p in parts)


def resolve_normalization(
    preset: str | Normalization | None, mean: str | None, std: str | None
) -> Normalization | None:
    """Combine ``--normalize PRESET`` (a name, or from Python a ``Normalization``) and explicit ``--mean/--std``."""
    if preset and (mean or std):
        raise UsageError("give either --normalize or --mean/--std, not both")
    if isinstance(preset, Normalization):
        return preset
    if preset:
        return PRESETS.get(preset)
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise UsageError("--mean and --std go together")
    norm = Normalization(_parse_floats(mean, "mean"), _parse_floats(std, "std"))
    if len(norm.mean) != len(norm.std):
        raise UsageError(f"--mean has {len(norm.mean)} values but --std has {len(norm.std)}")
    if any(s <= 0 for s in norm.std):
        raise UsageError("--std values must be > 0")
    return norm


# PIL's resampling filters by the names timm, torchvision and RobustBench use for them.
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class Preprocessing:
    """How a model's source says its images are prepared: geometry, then normalisation.

    ``resize`` is the shorter side before a centre crop of ``crop`` (both None: the
    images are used at the size they come in). ``mean``/``std`` None: the model takes
    pixels in [0,1] (RobustBench models normalise inside). ``source`` says where the
    values were read, e.g. ``timm pretrained_cfg test_resnet.r160_in1k``.
    """

    source: str
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    input_size: tuple[int, int, int] | None = None  # (C, H, W)
    resize: int | None = None
    crop: int | None = None
    interpolation: str = "bilinear"
    details: tuple[tuple[str, object], ...] = ()  # what the source adds (crop_pct, crop_mode, a preset name)

    def __post_init__(self) -> None:
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; known: {', '.join(INTERPOLATIONS)}")

    @property
    def normalization(self) -> Normalization | None:
        if self.mean is None or self.std is None:
            return None
        return Normalization(tuple(self.mean), tuple(self.std))

    def as_dict(self) -> dict[str, object]:
        """The ``model.preprocessing`` block of results.json."""
        return {"source": self.source, "mean": _listed(self.mean), "std": _listed(self.std),
                "input_size": _listed(self.input_size), "resize": self.resize, "crop": self.crop,
                "interpolation": self.interpolation, **dict(self.details)}


def _listed(values: tuple | None) -> list | None:
    return None if values is None else list(values)


def eval_geometry(height: int, width: int, crop_pct: float | None) -> tuple[int | None, int | None]:
    """timm's evaluation transform for a square input: shorter side floor(size / crop_pct), centre crop size.

    A non-square input has no shorter-side equivalent: no geometry (images keep their size).
    """
    if height != width:
        return None, None
    return math.floor(height / (crop_pct or 0.875)), height
