"""FGSM: one step of size eps along the gradient's sign (Goodfellow et al. 2015)."""

from __future__ import annotations

from typing import ClassVar

import torch

from robench.attacks.base import AttackParams, sign_or_normalized
from robench.attacks.gradient import GradientAttack, StepState


class FGSM(GradientAttack):
    name: ClassVar[str] = "fgsm"
    Params: ClassVar[type[AttackParams]] = AttackParams  # nothing to set: one step of size eps
    default_step_size: ClassVar[str] = "eps"

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor, state: StepState,
             t: torch.Tensor) -> torch.Tensor:
        return x_adv + state.step_size * sign_or_normalized(grad, state.norm)
