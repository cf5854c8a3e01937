"""What each metric of a results document means: its direction, its kind and how it is shown.

One table read by the result reader, ``compare``, ``gate`` and the terminal tables, so a
new metric (or a new CMC rank) is described once. ``rankN`` is a CMC value for any N.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# A fraction of n samples (or queries): sqrt(p(1-p)/n) is its standard error.
PROPORTION = "proportion"
# A bounded score that is not one binomial fraction (mAP, a mean of accuracies, Pi).
SCORE = "score"
# A number of images (a mean over trials, so not always whole).
COUNT = "count"
# A perturbation size in the threat model's norm, in eps units (a minimum-norm attack's median).
DISTANCE = "distance"

RANK_KEY = re.compile(r"^rank([0-9]+)$")


@dataclass(frozen=True)
class MetricInfo:
    name: str
    higher_is_better: bool  # True: a larger value means a more robust model
    kind: str  # PROPORTION, SCORE or COUNT
    percent: bool  # shown as a percentage of 1.0 (the document stores fractions)
    decimals: int  # as the papers print it

    def show(self, value: float | None) -> str:
        """The value as the tables print it; ``-`` when it is missing."""
        if value is None:
            return "-"
        return f"{100 * value if self.percent else value:.{self.decimals}f}"


_TABLE = {info.name: info for info in (
    MetricInfo("accuracy", True, PROPORTION, True, 2),
    MetricInfo("robust_accuracy", True, PROPORTION, True, 2),
    MetricInfo("mean_attack_accuracy", True, SCORE, True, 2),
    MetricInfo("success_rate", False, PROPORTION, True, 2),
    MetricInfo("mAP", True, SCORE, True, 1),
    MetricInfo("mINP", True, SCORE, True, 1),
    MetricInfo("recognition_rate", True, PROPORTION, True, 2),
    MetricInfo("misclassified", False, COUNT, False, 1),
    MetricInfo("pi", False, SCORE, False, 2),
    MetricInfo("pass_rate", True, PROPORTION, True, 1),  # the attack check's: problems solved / built
    MetricInfo("median_norm", True, DISTANCE, False, 4),  # the median minimal perturbation: larger is more robust
    MetricInfo("certified_accuracy", True, PROPORTION, True, 1),  # certify's: correct at a radius >= r
)}


def metric_info(name: str) -> MetricInfo:
    """The table's entry for ``name``; every ``rankN`` is a CMC proportion (higher is better)."""
    if name in _TABLE:
        return _TABLE[name]
    if RANK_KEY.match(name):
        return MetricInfo(name, True, PROPORTION, True, 1)
    # A metric this version does not know (a newer document's): a plain number, and a rise counts
    # as the loss, as for the attack-side metrics.
    return MetricInfo(name, False, SCORE, False, 2)


def higher_is_better(name: str) -> bool:
    return metric_info(name).higher_is_better


def is_proportion(name: str) -> bool:
    return metric_info(name).kind == PROPORTION


def rank_keys(keys: Iterable[str]) -> list[str]:
    """The CMC keys among ``keys`` (a metrics object or a list of names), in rank order."""
    ranked = [(k, int(m.group(1))) for k in keys if (m := RANK_KEY.match(k))]
    return [k for k, _ in sorted(ranked, key=lambda pair: pair[1])]


def reid_metric_keys(metrics: dict) -> list[str]:
    """What a ReID metrics object reports: its CMC ranks, then mAP and mINP."""
    return rank_keys(metrics) + ["mAP", "mINP"]
