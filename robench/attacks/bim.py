"""BIM: iterated FGSM clipped to the eps-ball, no random start (Kurakin et al. 2017)."""

from __future__ import annotations

from typing import ClassVar

import torch

from robench.attacks.base import AttackParams, sign_or_normalized
from robench.attacks.gradient import GradientAttack, StepSizeParams, StepState


class BIM(GradientAttack):
    name: ClassVar[str] = "bim"
    Params: ClassVar[type[AttackParams]] = StepSizeParams
    params: StepSizeParams
    default_step_size: ClassVar[str] = "eps/steps"

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor, state: StepState,
             t: torch.Tensor) -> torch.Tensor:
        return x_adv + state.step_size * sign_or_normalized(grad, state.norm)
