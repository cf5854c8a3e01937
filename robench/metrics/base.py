"""Accumulating metrics: ``update()`` per batch, ``compute()`` at the end.

The contract follows torchmetrics: every state is declared with ``add_state``
together with its default and the reduction that combines two accumulators
of it (``sum`` for counts, ``cat`` for per-sample tensors, ``max``/``min`` for
extremes such as peak memory). ``reset()`` returns each state to a fresh copy
of its default, ``merge(other)`` applies each state's declared reduction, and
``state_dict()``/``load_state_dict()`` move the states as plain numbers and
tensors (``torch.save``-able with ``weights_only=True``). Progress snapshots,
resume and the torchrun gather all go through these four calls.

A ``max``/``min`` state may default to ``None`` ("nothing seen yet"), which
every value replaces.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch


def _extreme(pick: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def combine(a: Any, b: Any) -> Any:
        if a is None or b is None:
            return b if a is None else a
        return pick(a, b)
    return combine


# cat states are lists of tensors: concatenating the lists keeps the order, first ``self`` then ``other``.
REDUCTIONS: dict[str, Callable[[Any, Any], Any]] = {
    "sum": lambda a, b: a + b,
    "cat": lambda a, b: [*a, *b],
    "max": _extreme(max),
    "min": _extreme(min),
}


class Metric:
    def __init__(self) -> None:
        self._declared: dict[str, tuple[Any, str]] = {}  # name -> (default, reduction)

    def add_state(self, name: str, default: Any, reduce: str) -> None:
        if reduce not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduce!r}; use one of {', '.join(REDUCTIONS)}")
        if reduce == "cat" and default != []:
            raise ValueError(f"a cat state starts as an empty list, not {default!r}")
        self._declared[name] = (default, reduce)
        setattr(self, name, copy.deepcopy(default))

    def reductions(self) -> dict[str, str]:
        return {name: reduce for name, (_, reduce) in self._declared.items()}

    def update(self, *args: Any) -> None:
        raise NotImplementedError

    def compute(self) -> Any:
        raise NotImplementedError

    def reset(self) -> None:
        # Fresh copies: a reset metric never shares a list with its defaults or another metric.
        for name, (default, _) in self._declared.items():
            setattr(self, name, copy.deepcopy(default))

    def merge(self, other: "Metric") -> None:
        """Fold ``other`` in, as a distributed reduction of the two would."""
        if type(other) is not type(self) or other.reductions() != self.reductions():
            raise TypeError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        for name, (_, reduce) in self._declared.items():
            setattr(self, name, REDUCTIONS[reduce](getattr(self, name), getattr(other, name)))

    def state_dict(self) -> dict[str, Any]:
        """Each state by name; a cat state as one tensor (empty: ``torch.empty(0)``)."""
        return {name: _saved(getattr(self, name), reduce) for name, (_, reduce) in self._declared.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self._declared):
            raise ValueError(f"{type(self).__name__} states are {sorted(self._declared)}, got {sorted(state)}")
        for name, (_, reduce) in self._declared.items():
            setattr(self, name, _loaded(state[name], reduce))

    def state_values(self) -> Any:
        """The states' values in declaration order, a lone state unwrapped: the progress file's layout."""
        values = list(self.state_dict().values())
        return values[0] if len(values) == 1 else values

    def load_state_values(self, values: Any) -> None:
        names = list(self._declared)
        self.load_state_dict({names[0]: values} if len(names) == 1 else dict(zip(names, values, strict=True)))


def _saved(value: Any, reduce: str) -> Any:
    if reduce == "cat":
        return torch.cat(value) if value else torch.empty(0)
    return value


def _loaded(value: Any, reduce: str) -> Any:
    if reduce == "cat":
        # An empty tensor stays out: its dtype (float) would promote the next parts on concatenation.
        return [value] if value.numel() else []
    return value


class MetricCollection:
    """Named metrics handled as one: reset, merge and (de)serialise each member."""

    def __init__(self, **metrics: Metric) -> None:
        self.metrics = metrics

    def __getattr__(self, name: str) -> Metric:
        try:
            return self.__dict__["metrics"][name]
        except KeyError:
            raise AttributeError(name) from None

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def merge(self, other: "MetricCollection") -> None:
        if list(other.metrics) != list(self.metrics):
            raise TypeError(f"cannot merge metrics {list(other.metrics)} into {list(self.metrics)}")
        for name, metric in self.metrics.items():
            metric.merge(other.metrics[name])

    def state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: metric.state_dict() for name, metric in self.metrics.items()}

    def load_state_dict(self, state: dict[str, dict[str, Any]]) -> None:
        _check_names(state, self.metrics)
        for name, metric in self.metrics.items():
            metric.load_state_dict(state[name])

    def state_values(self) -> dict[str, Any]:
        return {name: metric.state_values() for name, metric in self.metrics.items()}

    def load_state_values(self, values: dict[str, Any]) -> None:
        _check_names(values, self.metrics)
        for name, metric in self.metrics.items():
            metric.load_state_values(values[name])


def _check_names(state: dict, metrics: dict) -> None:
    if set(state) != set(metrics):
        raise ValueError(f"expected metrics {sorted(metrics)}, got {sorted(state)}")


class Accuracy(Metric):
    """Fraction of True in boolean per-sample outcomes."""

    # The states add_state declares (set as attributes by name).
    correct: int
    total: int

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

    parts: list[torch.Tensor]  # the state add_state declares

    def __init__(self) -> None:
        super().__init__()
        self.add_state("parts", [], "cat")

    def update(self, values: torch.Tensor) -> None:
        self.parts.append(values.detach().cpu())

    def compute(self) -> torch.Tensor:
        return torch.cat(self.parts) if self.parts else torch.empty(0)


class Scalar(Metric):
    """One number: ``update`` folds a value in with ``accumulate``; ``merge`` uses ``reduce``.

    The two differ for wall time: a process adds up its own seconds, while
    processes that run side by side take as long as the slowest one.
    """

    value: int | float | None  # the state add_state declares (None: nothing seen yet, for max/min)

    def __init__(self, accumulate: str = "sum", reduce: str | None = None, default: int | float | None = 0) -> None:
        super().__init__()
        if accumulate not in ("sum", "max", "min"):
            raise ValueError(f"a scalar accumulates by sum, max or min, not {accumulate!r}")
        self._accumulate = REDUCTIONS[accumulate]
        self.add_state("value", default, reduce or accumulate)

    def update(self, value: int | float) -> None:
        self.value = self._accumulate(self.value, value)

    def compute(self) -> int | float | None:
        return self.value
