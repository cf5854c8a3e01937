"""APGD: auto-PGD with a self-tuning step size (Croce & Hein 2020, the ensemble of AutoAttack).

Momentum steps from a random start in the eps-ball. The step size starts at 2*eps and
is halved at checkpoints ``w_j = ceil(p_j * steps)`` (``p_0 = 0``, ``p_1 = 0.22``,
``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``) when the loss rose in fewer than a
fraction ``rho`` of the steps since the last checkpoint, or when the step size was not
halved at the last checkpoint and the best loss has not improved since; a halving
restarts from the best point found so far.

All of the schedule is per sample (step size factor, best point and loss, counters,
previous iterate), kept in the slots' state and driven by the per-sample step counter,
so results do not depend on the batch size or on the pool's refill. The loop hands
``step`` the loss at the current iterate: step ``t`` first books the loss of ``x_t``
(best point, increase count, checkpoint test at ``t = w_j``), then takes the step.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from robench.attacks.base import AttackParams, Cost, sign_or_normalized
from robench.attacks.gradient import MAX_STEPS, GradientAttack, RandomStartParams, StepState
from robench.attacks.objectives import CrossEntropy, Objective
from robench.errors import UsageError


class DLR(Objective):
    """Difference of logits ratio: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), logits sorted descending.

    Invariant to shifting and rescaling the logits; needs at least three classes.
    """

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = outputs.float()
        if z.dim() != 2 or z.shape[1] < 3:
            raise UsageError(f"the dlr loss needs logits of at least 3 classes, got shape {tuple(z.shape)}")
        top = z.topk(3, dim=1).values
        z_y = z.gather(1, y.view(-1, 1)).squeeze(1)
        # The largest other logit: the runner-up where y is on top, the top one otherwise.
        other = torch.where(z.argmax(dim=1) == y, top[:, 1], top[:, 0])
        return -(z_y - other) / (top[:, 0] - top[:, 2] + 1e-12)

    def fooled(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(dim=1) != y

    def describe(self) -> dict:
        return {"loss": "dlr"}


class APGDParams(RandomStartParams):
    steps: int = Field(default=100, ge=1, le=MAX_STEPS)
    loss: Literal["ce", "dlr"] = "ce"
    rho: float = Field(default=0.75, gt=0, le=1)  # halve when the loss rose in fewer than rho of the steps
    alpha: float = Field(default=0.75, gt=0, le=1)  # momentum: weight of the new step (1 - alpha: the last move)


def checkpoints(steps: int) -> list[int]:
    """The checkpoints w_1 < w_2 < ... up to ``steps``, in exact integer arithmetic (p_j in hundredths)."""
    marks, before, p = [], 0, 22
    while True:
        w = -(-p * steps // 100)  # ceil(p/100 * steps)
        if w > steps:
            return marks
        if not marks or w > marks[-1]:
            marks.append(w)
        before, p = p, p + max(p - before - 3, 6)


class APGD(GradientAttack):
    name: ClassVar[str] = "apgd"
    Params: ClassVar[type[AttackParams]] = APGDParams
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    default_step_size: ClassVar[str] = "2*eps"  # the initial step size; halved per sample by the schedule

    def __init__(self, params: AttackParams | dict[str, Any] | None = None, *, loss: Objective | str | None = None,
                 **kwargs: Any) -> None:
        if isinstance(loss, str):  # APGD(loss="dlr"): the parameter, not an objective
            given = params.model_dump(exclude_unset=True) if isinstance(params, AttackParams) else dict(params or {})
            params, loss = {**given, "loss": loss}, None
        super().__init__(params, loss=loss, **kwargs)
        if self.params.loss == "dlr":
            if loss is not None and not isinstance(loss, (CrossEntropy, DLR)):
                raise UsageError(f"{self.name}: loss: dlr is for classifiers; this run gives its own objective")
            self.loss = DLR()
        self._marks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def cost(cls, params: AttackParams) -> Cost:
        return Cost(gradient=params.steps * params.restarts, forward=1)

    def schedule(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per step index t (0..steps): whether t is a checkpoint, and the length of the period it ends."""
        steps = self.params.steps
        if steps not in self._marks:
            is_mark = torch.zeros(steps + 1, dtype=torch.bool)
            period = torch.ones(steps + 1, dtype=torch.int64)
            last = 0
            for w in checkpoints(steps):
                is_mark[w], period[w], last = True, w - last, w
            self._marks[steps] = (is_mark, period)
        is_mark, period = self._marks[steps]
        return is_mark.to(device), period.to(device)

    def init_state(self, x_adv: torch.Tensor, state: StepState) -> dict[str, torch.Tensor]:
        n = len(x_adv)
        zeros = torch.zeros(n, dtype=torch.float32, device=x_adv.device)
        # Step 0 fills in the best point, its gradient and the losses from the first evaluation.
        return {"scale": torch.ones(n, dtype=x_adv.dtype, device=x_adv.device),  # step size / initial
                "x_prev": x_adv.clone(), "x_best": x_adv.clone(), "grad_best": torch.zeros_like(x_adv),
                "loss_best": zeros.clone(), "loss_prev": zeros.clone(), "loss_best_mark": zeros.clone(),
                "rises": torch.zeros(n, dtype=torch.int64, device=x_adv.device),
                "halved_last": torch.zeros(n, dtype=torch.bool, device=x_adv.device)}

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor, state: StepState,
             t: torch.Tensor) -> torch.Tensor:
        loss = loss.float()
        view = (-1, *[1] * (x_adv.dim() - 1))
        first = t == 0
        later = ~first
        # Book the loss of the current iterate x_t.
        state["rises"] = state["rises"] + (later & (loss > state["loss_prev"])).long()
        state["loss_prev"] = loss
        better = first | (loss > state["loss_best"])
        b = better.view(view)
        state["x_best"] = torch.where(b, x_adv, state["x_best"])
        state["grad_best"] = torch.where(b, grad, state["grad_best"])
        state["loss_best"] = torch.where(better, loss, state["loss_best"])
        state["loss_best_mark"] = torch.where(first, loss, state["loss_best_mark"])
        # Checkpoints: halve the step size and go back to the best point.
        is_mark, period = self.schedule(x_adv.device)
        at = is_mark[t] & later
        if bool(at.any()):
            oscillating = state["rises"].double() < self.params.rho * period[t].double()
            stalled = ~state["halved_last"] & (state["loss_best"] <= state["loss_best_mark"])
            halve = at & (oscillating | stalled)
            state["halved_last"] = torch.where(at, halve, state["halved_last"])
            state["loss_best_mark"] = torch.where(at, state["loss_best"], state["loss_best_mark"])
            state["rises"] = torch.where(at, torch.zeros_like(state["rises"]), state["rises"])
            state["scale"] = torch.where(halve, state["scale"] * 0.5, state["scale"])
            h = halve.view(view)
            x_adv = torch.where(h, state["x_best"], x_adv)
            grad = torch.where(h, state["grad_best"], grad)
        # The momentum step: z = P(x_k + eta * direction); x_{k+1} = P(x_k + a (z - x_k) + (1 - a) (x_k - x_{k-1})).
        a = torch.where(first, torch.ones_like(state["scale"]), torch.full_like(state["scale"], self.params.alpha))
        a = a.view(view)
        moved = x_adv - state["x_prev"]
        state["x_prev"] = x_adv
        eta = state.step_size * state["scale"].view(view)
        z = self.project(x_adv + eta * sign_or_normalized(grad, state.norm), state.clean, state.radius)
        return x_adv + (z - x_adv) * a + moved * (1 - a)
