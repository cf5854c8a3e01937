"""``attack: dmr``: a trained DMR perturbation generator (Wang et al., CVPR 2020) as a suite entry.

One forward pass of the generator per image and no gradient of the target: a
transfer attack, its generator trained on a surrogate by ``robench dmr train``.
Without an eps, the entry runs at the eps the generator was trained for.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field
from torch import nn

from robench.attacks.base import Attack, AttackParams, Cost, EpsBudget, Family, RunOutput
from robench.attacks.driver import RunContext
from robench.reid.generator import load_generator, perturb


class GeneratorParams(AttackParams):
    generator: str = Field(min_length=1)  # a file written by `robench dmr train`


class GeneratorAttack(Attack):
    name: ClassVar[str] = "dmr"
    Params: ClassVar[type[AttackParams]] = GeneratorParams
    params: GeneratorParams
    family: ClassVar[Family] = "transfer"
    norms: ClassVar[tuple[str, ...]] = ("linf",)
    eps_budget: ClassVar[EpsBudget] = "optional"

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.generator, self.config = load_generator(self.params.generator)

    @classmethod
    def cost(cls, params: AttackParams) -> Cost:
        return Cost(forward=1)

    def effective_eps(self, eps: float | None) -> float:
        return self.config.eps if eps is None else eps

    def describe(self, eps: float | None) -> dict[str, Any]:
        return {"norm": "linf", "generator": str(self.params.generator), "trained_eps": self.config.eps}

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            context: RunContext) -> RunOutput:
        self.generator.to(x.device)
        radius = self.radius(self.required_eps(eps), x)  # never None: effective_eps fills it in
        return RunOutput(context.in_batches(lambda part: perturb(self.generator, part, radius).to(x.dtype), x))
