"""Accumulating metrics: ``update()`` per batch, ``compute()`` at the end.

Each state declares how it merges across processes: ``sum`` (counts) or
``cat`` (per-sample tensors). ``merge()`` combines two accumulators the
same way a distributed all-reduce / all-gather would.
"""

from __future__ import annotations

from typing import Any

import torch


class Metric:
    def __init__(self) -> None:
        self._reductions: dict[str, str] = {}

    def add_state(self, name: str, default: Any, reduce: str) -> None:
        if reduce not in ("sum", "cat"):
            raise ValueError(f"unknown reduction {reduce!r}")
        self._reductions[name] = reduce
        setattr(self, name, default)

    def update(self, *args: Any) -> None:
        raise NotImplementedError

    def compute(self) -> Any:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._reductions}

    def merge(self, other: "Metric") -> None:
        for name, how in self._reductions.items():
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, mine + theirs)  # sums add; cat states are lists that concatenate


class Accuracy(Metric):
    """Fraction of True in boolean per-sample outcomes."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", 0, "sum")
        self.add_state("total", 0, "sum")

    def update(self, outcome: torch.Tensor) -> None:
        self.correct += int(outcome.sum())
        self.total += int(outcome.numel())

    def compute(self) -> float | None:
        return self.correct / self.total if self.total else None


class Collected(Metric):
    """Concatenates per-sample tensors (kept on the CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("parts", [], "cat")

    def update(self, values: torch.Tensor) -> None:
        self.parts.append(values.detach().cpu())

    def compute(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.empty(0)
