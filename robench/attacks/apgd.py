"""APGD: auto-PGD with a self-tuning step size (Croce & Hein 2020, the ensemble of AutoAttack).

``apgd-ce`` and ``apgd-dlr`` are AutoAttack's APGD on the cross-entropy and on the
difference-of-logits-ratio loss; ``apgd`` takes the loss as a parameter. The algorithm
follows the reference implementation (fra31/auto-attack, ``APGDAttack`` in
``autopgd_base.py``) for L-inf and L2:

* random start: L-inf ``x + eps * t / max|t|`` with ``t`` uniform in [-1, 1] (the largest
  entry has size eps); L2 ``x + eps * t / ||t||`` with ``t`` standard normal (on the eps
  sphere); then clipped to [0, 1];
* step size 2*eps at first; momentum steps
  ``z = P(x_k + eta * direction)``, ``x_{k+1} = P(x_k + a (z - x_k) + (1 - a) (x_k - x_{k-1}))``
  with ``a = 1`` for the first step and ``alpha`` (0.75) after;
* checkpoints: the first after ``max(int(0.22 n), 1)`` steps, each period then shorter by
  ``max(int(0.03 n), 1)`` down to ``max(int(0.06 n), 1)`` (:func:`checkpoints`; for
  n = 100: 22, 41, 57, 70, 80, 87, 93, 99);
* at a checkpoint closing a period of ``k`` steps the step size is halved when the loss
  rose at most ``k * rho`` times in the period (compared in float32, as the reference
  does), or when the step size was not halved at the previous checkpoint and the best loss
  has not improved since (never at the first checkpoint: the reference starts as if it had
  just halved). The first period's count compares the first step's loss with 0 (the
  reference compares it with its still-empty loss history, not with the loss of the start);
  later periods compare each loss with the one before, the loss of the previous
  checkpoint's iterate included. A halving restarts from the best point and its gradient;
* a sample counts as fooled if any iterate, the start included, fooled it.

All of the schedule is per sample (step size factor, best point and loss, counters,
previous iterate), kept in the slots' state and driven by the per-sample step counter,
so results do not depend on the batch size or on the pool's refill. The loop hands
``step`` the loss at the current iterate: step ``t`` first books the loss of ``x_t``
(best point, rise count, checkpoint test at ``t = w_j``), then takes the step.

Deviations from the reference, all deliberate:

* random numbers come from robench's counter-based streams keyed by the sample's index
  and the restart (never torch's global RNG): the same distributions, so the same
  algorithm, but not the reference's bits; results do not depend on the batch size;
* a fooled sample keeps the first iterate that fooled it and leaves its slot (the
  reference keeps attacking it and keeps the last such iterate; the verdict is the same,
  any-iterate either way). A sample never fooled keeps its last iterate (the reference
  returns the clean input): both are robust points of the ball;
* EOT (``eot`` > 1, AutoAttack's ``rand`` version uses 20): the gradient of a step is the
  mean over ``eot`` forward+backward passes at the same iterate, as in the reference; the
  loss booked by the schedule is the mean of the draws' losses (the reference books the
  last draw's), and whether the iterate fooled the model is read from the first draw's
  outputs (the reference reads the last draw's; the draws are alike, so the chance is the
  same);
* ``random_start: false`` (start at ``x``) or a radius, ``alpha`` and per-channel eps are
  robench's additions; the defaults are the reference's. The losses are computed in float32
  whatever the model's precision. L1 is not implemented.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, cast

import torch
from pydantic import Field
from torch import nn

from robench.attacks import randomness
from robench.attacks.base import AttackParams, Cost, Eps, sign_or_normalized
from robench.attacks.gradient import MAX_STEPS, GradientAttack, RandomStartParams, StepState
from robench.attacks.objectives import CrossEntropy, Objective
from robench.errors import UsageError


def logits_gradient(outputs: torch.Tensor, picked: torch.Tensor, d_picked: torch.Tensor, top: torch.Tensor,
                    d_top: torch.Tensor) -> torch.Tensor:
    """What autograd hands ``outputs`` from a loss of gathered logits (columns ``picked``, partials ``d_picked``)
    and of top-k logits (columns ``top``, partials ``d_top``): the gather's and the top-k's backward, each a
    scatter into zeros, added; in the outputs' dtype, as the backward of ``.float()`` casts it.

    Both scatters add into one tensor of zeros: each hits a column at most once (its columns are distinct),
    and 0 + a, then + b, rounds once as a + b does (0 + -0.0 is +0.0 either way)."""
    z = outputs.float()
    grad = torch.zeros_like(z).scatter_add_(1, picked, d_picked).scatter_add_(1, top, d_top)
    return grad.to(outputs.dtype)


class DLR(Objective):
    """Difference of logits ratio: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), logits sorted descending.

    Invariant to shifting and rescaling the logits; needs at least three classes.
    """

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        negated_margin, denominator, _, _ = self._parts(outputs, y)
        return negated_margin / denominator

    def _parts(self, outputs: torch.Tensor, y: torch.Tensor):
        """The loss's numerator and denominator, the three largest logits and whether y is on top."""
        z = outputs.float()
        if z.dim() != 2 or z.shape[1] < 3:
            raise UsageError(f"the dlr loss needs logits of at least 3 classes, got shape {tuple(z.shape)}")
        top = z.topk(3, dim=1)
        z_y = z.gather(1, y.view(-1, 1)).squeeze(1)
        # The largest other logit: the runner-up where y is on top, the top one otherwise.
        y_on_top = z.argmax(dim=1) == y
        other = torch.where(y_on_top, top.values[:, 1], top.values[:, 0])
        return -(z_y - other), top.values[:, 0] - top.values[:, 2] + 1e-12, top, y_on_top

    def losses_and_output_grad(self, outputs: torch.Tensor,
                               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        # Autograd's backward of __call__, node by node: the quotient's two partials (-grad * (a / b) / b for
        # the denominator), the margin's +-1, the where's split between the runner-up and the top logit, and
        # the gather's and the top-k's scatters into zeros, added.
        if not self._loss_is(DLR):
            return None
        negated_margin, denominator, top, y_on_top = self._parts(outputs, y)
        losses = negated_margin / denominator
        d_margin = torch.ones_like(denominator) / denominator  # d loss / d(z_y - other) is its negation
        d_denominator = -(losses / denominator)
        d_top = torch.stack([d_denominator + torch.where(y_on_top, 0.0, d_margin),
                             torch.where(y_on_top, d_margin, 0.0), -d_denominator], dim=1)
        return losses, logits_gradient(outputs, y.view(-1, 1), (-d_margin).unsqueeze(1), top.indices, d_top)

    def fooled(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(dim=1) != y

    def describe(self) -> dict:
        return {"loss": "dlr"}


class APGDCommonParams(RandomStartParams):
    """What every APGD variant takes: the reference's defaults (100 steps, rho 0.75, 1 restart)."""

    steps: int = Field(default=100, ge=1, le=MAX_STEPS)
    rho: float = Field(default=0.75, gt=0, le=1)  # halve when the loss rose at most rho of a period's steps
    alpha: float = Field(default=0.75, gt=0, le=1)  # momentum: weight of the new step (1 - alpha: the last move)
    eot: int = Field(default=1, ge=1, le=1000)  # gradient passes averaged per step (randomised models)


class APGDParams(APGDCommonParams):
    loss: Literal["ce", "dlr"] = "ce"


def checkpoints(steps: int) -> list[int]:
    """The steps after which the step size is checked, by the reference's integer rule.

    The first period is ``max(int(0.22 n), 1)`` steps; each next one is shorter by
    ``max(int(0.03 n), 1)``, down to ``max(int(0.06 n), 1)``. The float products are the
    reference's own (``int(0.22 * n)``), so every ``n`` gives its periods.
    """
    period = max(int(0.22 * steps), 1)
    shrink, shortest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    marks, mark = [], period
    while mark <= steps:
        marks.append(mark)
        period = max(period - shrink, shortest)
        mark += period
    return marks


class APGD(GradientAttack):
    name: ClassVar[str] = "apgd"
    Params: ClassVar[type[AttackParams]] = APGDParams
    params: APGDCommonParams  # APGDParams; the variants named after their loss take the common ones
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    default_step_size: ClassVar[str] = "2*eps"  # the initial step size; halved per sample by the schedule
    fixed_loss: ClassVar[str | None] = None  # the variants named after their loss have no loss parameter

    def __init__(self, params: AttackParams | dict[str, Any] | None = None, *, loss: Objective | str | None = None,
                 **kwargs: Any) -> None:
        if isinstance(loss, str):  # APGD(loss="dlr"): the parameter, not an objective
            given = params.model_dump(exclude_unset=True) if isinstance(params, AttackParams) else dict(params or {})
            params, loss = {**given, "loss": loss}, None
        super().__init__(params, loss=loss, **kwargs)
        own = self.own_objective()
        if own is not None:
            if loss is not None and not isinstance(loss, (CrossEntropy, type(own))):
                raise UsageError(f"{self.name}: the {self.loss_name()} loss is for classifiers; "
                                 "this run gives its own objective")
            self.loss = own
        self._schedules: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._alphas: dict[torch.dtype, tuple[float, float]] = {}  # (alpha, 1 - alpha) as each dtype rounds them

    def loss_name(self) -> str:
        # Only the variants named after their loss drop the loss parameter (and set fixed_loss).
        return self.fixed_loss or cast(APGDParams, self.params).loss

    def own_objective(self) -> Objective | None:
        """The objective the loss names; None keeps the run's (cross-entropy for classifiers)."""
        return DLR() if self.loss_name() == "dlr" else None

    @classmethod
    def cost(cls, params: AttackParams) -> Cost:
        p = cast(APGDCommonParams, params)  # cost is asked of the class's own Params
        return Cost(gradient=p.eot * p.steps * p.restarts, forward=1)

    def gradient_passes(self) -> int:
        return self.params.eot

    # -- random start and gradient --------------------------------------------------------------------------
    def init(self, x: torch.Tensor, start: Eps | None, sample_ids: torch.Tensor, restart: int) -> torch.Tensor:
        """The reference's start: a uniform (L-inf) or normal (L2) draw rescaled to size ``start``."""
        if start is None:
            return x
        key = randomness.stream_key(self.seed, self.stream, restart)
        shape, view = tuple(x.shape[1:]), (-1, *[1] * (x.dim() - 1))
        if self.norm == "linf":
            t = 2.0 * randomness.uniform(sample_ids, shape, key, x.device).to(x.dtype) - 1.0
            size = t.flatten(1).abs().amax(dim=1)
        else:
            t = randomness.normal(sample_ids, shape, key, x.device).to(x.dtype)
            size = (t ** 2).flatten(1).sum(dim=1).sqrt()
        return x + start * (t / (size.view(view) + 1e-12))

    def loss_and_grad(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """Mean loss and gradient over ``eot`` passes; the outputs are the first pass's."""
        outputs, losses, grad = super().loss_and_grad(model, x, y)
        draws = self.params.eot
        if draws == 1:
            return outputs, losses, grad
        for _ in range(draws - 1):
            _, more_losses, more_grad = super().loss_and_grad(model, x, y)
            losses, grad = losses + more_losses, grad + more_grad
        return outputs, losses / draws, grad / draws

    # -- the step-size schedule -----------------------------------------------------------------------------
    def schedule(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Per step index t (0..steps): whether t is a checkpoint, and the most rises that count as oscillating."""
        steps = self.params.steps
        if (steps, device) not in self._schedules:
            is_mark = torch.zeros(steps + 1, dtype=torch.bool)
            most_rises = torch.zeros(steps + 1, dtype=torch.float32)
            last = 0
            for w in checkpoints(steps):
                # k * rho in double, then float32: the reference compares float32 counts with it.
                is_mark[w], most_rises[w], last = True, (w - last) * self.params.rho, w
            self._schedules[steps, device] = is_mark.to(device), most_rises.to(device)
        return self._schedules[steps, device]

    def init_state(self, x_adv: torch.Tensor, state: StepState) -> dict[str, torch.Tensor]:
        n, device = len(x_adv), x_adv.device
        zeros = torch.zeros(n, dtype=torch.float32, device=device)
        # Step 0 fills in the best point, its gradient and its loss from the first evaluation.
        return {"scale": torch.ones(n, dtype=x_adv.dtype, device=device),  # step size / initial
                "x_prev": x_adv.clone(), "x_best": x_adv.clone(), "grad_best": torch.zeros_like(x_adv),
                "loss_best": zeros.clone(), "loss_best_mark": zeros.clone(),
                # The reference's loss history starts at zeros: the first step's loss is compared with 0.
                "loss_prev": zeros.clone(),
                "rises": torch.zeros(n, dtype=torch.int64, device=device),
                # As if halved just before the first checkpoint: the no-improvement test skips it.
                "halved_last": torch.ones(n, dtype=torch.bool, device=device)}

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor, state: StepState,
             t: torch.Tensor) -> torch.Tensor:
        loss = loss.float()
        view = (-1, *[1] * (x_adv.dim() - 1))
        # Slots at their first step (t == 0) only where the loop says some are: most steps have none, and
        # then the masks below are all false and their selections the plain values (the same numbers).
        first = t == 0 if state.starting else None
        later = None if first is None else ~first
        # Book the loss of the current iterate x_t (the start's loss is not part of the history).
        rose = loss > state["loss_prev"]
        state["rises"] = state["rises"] + (rose if later is None else later & rose)  # int64 + bool: int64
        state["loss_prev"] = loss if later is None else torch.where(later, loss, state["loss_prev"])
        better = loss > state["loss_best"]
        better = better if first is None else first | better
        b = better.view(view)
        state["x_best"] = torch.where(b, x_adv, state["x_best"])
        state["grad_best"] = torch.where(b, grad, state["grad_best"])
        state["loss_best"] = torch.where(better, loss, state["loss_best"])
        if first is not None:
            state["loss_best_mark"] = torch.where(first, loss, state["loss_best_mark"])
        x_adv, grad = self._checkpoint(x_adv, grad, state, t, later)
        # The momentum step: z = P(x_k + eta * direction); x_{k+1} = P(x_k + a (z - x_k) + (1 - a) (x_k - x_{k-1})).
        a = self._momentum_weights(first, state["scale"], view)
        moved = x_adv - state["x_prev"]
        state["x_prev"] = x_adv
        eta = state.step_size * state["scale"].view(view)
        if state.norm == "linf":
            # x + eta * sign(g) in one operation: eta * (+-1 or 0) is exact, so one rounding either way.
            z = state.project(torch.addcmul(x_adv, eta, grad.sign()), self.project)
        else:
            z = state.project(x_adv + eta * sign_or_normalized(grad, state.norm), self.project)
        if isinstance(a, tuple):
            return x_adv + (z - x_adv) * a[0] + moved * a[1]
        return x_adv + (z - x_adv) * a + moved * (1 - a)

    def _momentum_weights(self, first: torch.Tensor | None, scale: torch.Tensor,
                          view: tuple[int, ...]) -> torch.Tensor | tuple[float, float]:
        """``a`` per slot (1 at a slot's first step, ``alpha`` after), or with no slot at its first step
        ``(alpha, 1 - alpha)`` as numbers: float32's values, so each product rounds as the tensors' would."""
        if first is None:
            if scale.dtype not in self._alphas:
                alpha = torch.tensor(self.params.alpha, dtype=scale.dtype)
                self._alphas[scale.dtype] = float(alpha), float(1 - alpha)
            return self._alphas[scale.dtype]
        return torch.where(first, torch.ones_like(scale), torch.full_like(scale, self.params.alpha)).view(view)

    def _checkpoint(self, x_adv: torch.Tensor, grad: torch.Tensor, state: StepState, t: torch.Tensor,
                    later: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """At a checkpoint: halve the step size where the loss oscillated or stalled, from the best point."""
        is_mark, most_rises = self.schedule(x_adv.device)
        at = is_mark.index_select(0, t)
        at = at if later is None else at & later
        if not bool(at.any()):
            return x_adv, grad
        oscillating = state["rises"].float() <= most_rises[t]
        stalled = ~state["halved_last"] & (state["loss_best"] <= state["loss_best_mark"])
        halve = at & (oscillating | stalled)
        state["halved_last"] = torch.where(at, halve, state["halved_last"])
        state["loss_best_mark"] = torch.where(at, state["loss_best"], state["loss_best_mark"])
        state["rises"] = torch.where(at, torch.zeros_like(state["rises"]), state["rises"])
        state["scale"] = torch.where(halve, state["scale"] * 0.5, state["scale"])
        h = halve.view(-1, *[1] * (x_adv.dim() - 1))
        return torch.where(h, state["x_best"], x_adv), torch.where(h, state["grad_best"], grad)


class APGDCE(APGD):
    """AutoAttack's APGD-CE: APGD on the cross-entropy."""

    name: ClassVar[str] = "apgd-ce"
    Params: ClassVar[type[AttackParams]] = APGDCommonParams
    fixed_loss: ClassVar[str | None] = "ce"


class APGDDLR(APGD):
    """AutoAttack's APGD-DLR: APGD on the difference of logits ratio (needs at least 3 classes)."""

    name: ClassVar[str] = "apgd-dlr"
    Params: ClassVar[type[AttackParams]] = APGDCommonParams
    fixed_loss: ClassVar[str | None] = "dlr"
