"""What ``robench eval``'s progress counts: sample-attacks, cost-weighted work and the ETA from them.

The unit people read is a sample-attack (one sample through one suite entry; the clean pass is not
counted). The work is weighed by each entry's cost per sample, and within an entry by the passes its
attack reports, so the ETA does not jump when the run moves from cheap to expensive entries.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

# An ETA from the first 2% of the work (or the first minute) swings by factors: it is not shown.
EARLY_SHARE, EARLY_SECONDS = 0.02, 60.0


@dataclass
class Work:
    """Sample-attacks and cost-weighted work, done and in all."""

    weights: Sequence[float]  # per entry; the clean pass weighs 1 per sample
    samples: int
    done_units: int = 0
    done_weight: float = 0.0
    started: float = field(default_factory=time.monotonic)
    start_weight: float = 0.0  # work found finished (a resumed run): not part of this process's speed
    ticked: float = 0.0  # weight the entry under way has reported pass by pass, before its ``add``

    @property
    def total_units(self) -> int:
        return self.samples * len(self.weights)

    @property
    def total_weight(self) -> float:
        return self.samples * (1.0 + sum(self.weights))

    def add(self, entry: int, samples: int) -> None:
        if entry < 0:
            self.done_weight += samples
            return
        self.done_units += samples
        # Early-stopped samples make fewer passes than their weight: the rest is added now.
        self.done_weight += max(0.0, samples * self.weights[entry] - self.ticked)
        self.ticked = 0.0

    def tick(self, weight: float) -> None:
        """Passes an attack just made (weighed as ``weights`` are): the bar moves within an entry."""
        weight = min(weight, max(0.0, self.total_weight - self.done_weight))
        self.done_weight += weight
        self.ticked += weight

    def skip(self, samples: int) -> None:
        """Samples finished before a resume."""
        if not samples:
            return
        self.done_units += samples * len(self.weights)
        self.done_weight += samples * (1.0 + sum(self.weights))
        self.start_weight = self.done_weight

    def seconds_left(self) -> float | None:
        spent = time.monotonic() - self.started
        gained = self.done_weight - self.start_weight
        if gained <= 0 or spent <= 0:
            return None
        if gained < EARLY_SHARE * (self.total_weight - self.start_weight) and spent < EARLY_SECONDS:
            return None  # the first segment's speed (compilation, warm-up) says little: no ETA yet
        return max(0.0, (self.total_weight - self.done_weight) * spent / gained)


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
