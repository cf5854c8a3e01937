"""PGD: BIM from a random start in the eps-ball, with restarts (Madry et al. 2018)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field, field_validator

from robench.attacks.base import AttackParams
from robench.attacks.bim import BIM
from robench.attacks.gradient import StepSizeParams, random_start_value


class PGDParams(StepSizeParams):
    # true: uniform in the eps-ball; a number: uniform in a ball of that radius (suite units;
    # the hierarchical-feature-alignment paper starts in U(-alpha, alpha)); false: at x.
    random_start: bool | float = True
    restarts: int = Field(default=1, ge=1, le=1000)

    @field_validator("random_start", mode="before")
    @classmethod
    def _start(cls, raw: Any) -> Any:
        return random_start_value(raw)


class PGD(BIM):
    """BIM's step; the random start and restarts come from the parameters (read by the gradient loop)."""

    name: ClassVar[str] = "pgd"
    Params: ClassVar[type[AttackParams]] = PGDParams
    # Madry et al.: room to move across the ball from a random start.
    default_step_size: ClassVar[str] = "2.5*eps/steps"
