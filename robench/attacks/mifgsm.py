"""MI-FGSM: momentum iterative FGSM (Dong et al. 2018), accumulating L1-normalised gradients."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from robench.attacks.base import AttackParams, sign_or_normalized
from robench.attacks.gradient import GradientAttack, StepSizeParams, StepState


class MIFGSMParams(StepSizeParams):
    decay: float = Field(default=1.0, ge=0)


class MIFGSM(GradientAttack):
    name: ClassVar[str] = "mifgsm"
    Params: ClassVar[type[AttackParams]] = MIFGSMParams
    params: MIFGSMParams
    default_step_size: ClassVar[str] = "eps/steps"

    def init_state(self, x_adv: torch.Tensor, state: StepState) -> dict[str, torch.Tensor]:
        return {"momentum": torch.zeros_like(x_adv)}

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor, state: StepState,
             t: torch.Tensor) -> torch.Tensor:
        l1 = grad.abs().flatten(1).mean(dim=1).view(-1, *[1] * (grad.dim() - 1))
        state["momentum"] = self.params.decay * state["momentum"] + grad / (l1 + 1e-12)
        return x_adv + state.step_size * sign_or_normalized(state["momentum"], state.norm)
