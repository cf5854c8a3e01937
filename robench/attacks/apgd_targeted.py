"""APGD-T: APGD on the targeted DLR loss, one run per target class (AutoAttack's ``apgd-t``).

Follows the reference implementation (fra31/auto-attack, ``APGDAttack_targeted`` in
``autopgd_base.py``): the targets are the classes with the highest clean logits other
than the true one, the second highest first, at most ``targets`` of them (9, AutoAttack's
standard version; ``n_classes - 1`` where the model has fewer classes). Each target gets
a fresh APGD run (random start, step size 2*eps, schedule from the start) of ``steps``
steps, ``restarts`` times, on the samples no earlier run has fooled. The loss is

    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)

with ``z_pi1 >= z_pi2 >= ...`` the sorted logits and ``t`` the target; success means
misclassified (any class but the true one), as in the reference. The targeted DLR loss
needs at least four classes: fewer is a usage error.

On robench's gradient loop the target runs are the loop's restarts (restart number
``k * restarts + r`` is the r-th run on the k-th target), so each has its own random
stream and the loop's early stop and refill apply unchanged. The clean logits that rank
the targets cost one forward pass per sample, counted in ``forward_evals``. Everything
the APGD module lists as faithful or deviating (:mod:`robench.attacks.apgd`) holds here
too; in addition the ranking excludes the true class explicitly (the reference takes the
second-highest logit, which is the highest other class on the clean-correct samples it
attacks), and it is computed once rather than before every target run (the same logits
for a deterministic model).
"""

from __future__ import annotations

from typing import Any, ClassVar, cast

import torch
from pydantic import Field
from torch import nn

from robench.attacks.apgd import APGD, APGDCommonParams, logits_gradient
from robench.attacks.base import AttackParams, Cost, RunOutput
from robench.attacks.driver import RunContext
from robench.attacks.objectives import Objective
from robench.errors import UsageError

MIN_CLASSES = 4  # the loss's denominator reads the 1st, 3rd and 4th largest logits


class TargetedDLR(Objective):
    """Targeted difference of logits ratio; its labels are rows of (true class, target class)."""

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        negated_gap, denominator, _ = self._parts(outputs, labels)
        return negated_gap / denominator

    def _parts(self, outputs: torch.Tensor, labels: torch.Tensor):
        """The loss's numerator and denominator, and the four largest logits."""
        z = outputs.float()
        if z.dim() != 2 or z.shape[1] < MIN_CLASSES:
            raise UsageError(f"the targeted dlr loss needs logits of at least {MIN_CLASSES} classes, "
                             f"got shape {tuple(z.shape)}")
        top = z.topk(4, dim=1)
        picked = z.gather(1, labels)  # z_y and z_t side by side: one gather
        values = top.values
        return -(picked[:, 0] - picked[:, 1]), values[:, 0] - 0.5 * (values[:, 2] + values[:, 3]) + 1e-12, top

    def losses_and_output_grad(self, outputs: torch.Tensor,
                               labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        # Autograd's backward of __call__, node by node (see DLR): the quotient's partials, +-1 for z_y and z_t,
        # the half for the 3rd and 4th logits, and the gather's and the top-k's scatters into zeros, added.
        if not self._loss_is(TargetedDLR):
            return None
        negated_gap, denominator, top = self._parts(outputs, labels)
        losses = negated_gap / denominator
        d_gap = torch.ones_like(denominator) / denominator  # d loss / d(z_y - z_t) is its negation
        d_denominator = -(losses / denominator)
        d_lower = -d_denominator * 0.5
        d_top = torch.stack([d_denominator, torch.zeros_like(d_gap), d_lower, d_lower], dim=1)
        return losses, logits_gradient(outputs, labels, torch.stack([-d_gap, d_gap], dim=1), top.indices, d_top)

    def fooled(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(dim=1) != y

    def describe(self) -> dict:
        return {"loss": "dlr-targeted"}


class APGDTargetedParams(APGDCommonParams):
    targets: int = Field(default=9, ge=1, le=1000)  # target classes, the highest clean logits first


class APGDTargeted(APGD):
    name: ClassVar[str] = "apgd-t"
    Params: ClassVar[type[AttackParams]] = APGDTargetedParams
    params: APGDTargetedParams
    fixed_loss: ClassVar[str | None] = "dlr-targeted"

    def __init__(self, params: AttackParams | dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._targets: torch.Tensor | None = None  # per input row, its target classes in order (during run)

    def own_objective(self) -> Objective:
        return TargetedDLR()

    @classmethod
    def cost(cls, params: AttackParams) -> Cost:
        # The clean pass that ranks the targets, and the base's scoring pass.
        p = cast(APGDTargetedParams, params)  # cost is asked of the class's own Params
        return Cost(gradient=p.eot * p.targets * p.steps * p.restarts, forward=2)

    def restarts(self) -> int:
        """The loop's restarts: ``restarts`` runs per target class."""
        targets = self.params.targets if self._targets is None else self._targets.shape[1]
        return targets * self.params.restarts

    def describe(self, eps: float | None) -> dict[str, Any]:
        return {**super().describe(eps), "restarts": self.params.restarts}

    def loss_labels(self, labels: torch.Tensor, rows: torch.Tensor, restart: torch.Tensor) -> torch.Tensor:
        assert self._targets is not None  # run ranks them before the loop asks
        target = self._targets[rows, restart // self.params.restarts]
        return torch.stack([labels, target], dim=1)

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            context: RunContext) -> RunOutput:
        self._targets = self.ranked_targets(model, x, y, context)
        try:
            out = super().run(model, x, y, eps, context)
        finally:
            self._targets = None
        out.forward_evals += len(x)
        return out

    def ranked_targets(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, context: RunContext) -> torch.Tensor:
        """Per row, the classes other than ``y`` with the highest clean logits, highest first."""
        logits = context.in_batches(lambda part: model(part).float(), x)
        classes = logits.shape[1] if logits.dim() == 2 else 0
        if classes < MIN_CLASSES:
            raise UsageError(f"{self.name} needs a classifier of at least {MIN_CLASSES} classes for the targeted "
                             f"dlr loss; the model gives {classes}")
        logits[torch.arange(len(x), device=x.device), y] = -torch.inf  # the true class is never a target
        count = min(self.params.targets, classes - 1)
        return logits.sort(dim=1, descending=True).indices[:, :count]
