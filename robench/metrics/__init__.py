"""Metric accumulators with declared, mergeable states."""

from robench.metrics.base import Accuracy, Collected, Metric, MetricCollection, Scalar

__all__ = ["Accuracy", "Collected", "Metric", "MetricCollection", "Scalar"]
