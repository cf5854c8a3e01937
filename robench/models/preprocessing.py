"""Normalisation presets: preprocessing travels with the model, never with the attack."""

from __future__ import annotations

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
    preset: str | None, mean: str | None, std: str | None
) -> Normalization | None:
    """Combine ``--normalize PRESET`` and explicit ``--mean/--std``."""
    if preset and (mean or std):
        raise UsageError("give either --normalize or --mean/--std, not both")
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
