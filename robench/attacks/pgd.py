"""PGD: BIM from a random start in the eps-ball, with restarts (Madry et al. 2018)."""

from __future__ import annotations

from typing import ClassVar

from robench.attacks.base import AttackParams
from robench.attacks.bim import BIM
from robench.attacks.gradient import RandomStartParams, StepSizeParams


class PGDParams(RandomStartParams, StepSizeParams):
    """Steps and step size, a random start (default: uniform in the eps-ball) and restarts."""


class PGD(BIM):
    """BIM's step; the random start and restarts come from the parameters (read by the gradient loop)."""

    name: ClassVar[str] = "pgd"
    Params: ClassVar[type[AttackParams]] = PGDParams
    params: PGDParams
    # Madry et al.: room to move across the ball from a random start.
    default_step_size: ClassVar[str] = "2.5*eps/steps"
