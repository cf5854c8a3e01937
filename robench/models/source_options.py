"""What every named source shares: the options that pick a model's weights, and one-line library errors.

Kept apart from ``robench.models.sources`` so that ``robench.models.robustbench_zoo``, which
``sources`` dispatches to, needs nothing from it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceOptions:
    """The options that pick a named model's weights (``--weights``, ``--num-classes``, RobustBench's)."""

    weights: str | None = None
    num_classes: int | None = None
    dataset: str | None = None
    threat_model: str | None = None
    model_dir: str | None = None
    trust_checkpoint: bool = False

    def robustbench_given(self) -> list[str]:
        return [flag for flag, value in (("--dataset", self.dataset), ("--threat-model", self.threat_model),
                                         ("--model-dir", self.model_dir)) if value is not None]


def first_line(exc: BaseException) -> str:
    """Libraries raise multi-line errors (a state dict's key lists); the user gets one line."""
    text = str(exc).strip().splitlines()
    return (text[0].rstrip(".") if text else type(exc).__name__)[:400]
