"""Metric accumulators with mergeable states."""

from robench.metrics.base import Accuracy, Collected, Metric

__all__ = ["Accuracy", "Collected", "Metric"]
