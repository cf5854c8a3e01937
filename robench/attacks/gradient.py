"""Gradient attacks: a subclass writes ``step`` (and optionally ``init``/``init_state``, and
``loss_labels``/``gradient_passes`` for per-slot targets or several passes per step).

``GradientAttack.run`` hands :class:`GradientSearch`, the per-slot logic, to the slot
driver (:mod:`robench.attacks.driver`): a sample leaves its slot when it is fooled
(any-iterate) or has run all its steps and restarts, and with refill the slot is given
to the next sample still to attack, so the model keeps seeing full batches. Each slot
carries its own step counter, restart and state; random starts are keyed by the
sample's index, so every outcome is the one the plain path (no refill) gives.

Which iterate counts:

* any-iterate (default): a sample fooled at *any* iterate counts as fooled and that
  iterate is kept as its adversarial example (AutoAttack's rule);
* final-iterate (``final_iterate=True``): only the last iterate of a restart counts,
  as torchattacks and most papers report.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from robench.attacks import randomness
from robench.attacks.base import Attack, AttackParams, Cost, Eps, Family, RunOutput, sign_or_normalized
from robench.attacks.driver import RunContext, SlotSearch
from robench.attacks.pool import Pool
from robench.errors import UsageError
from robench.expressions import check_expr, eval_expr

MAX_STEPS = 100_000


class StepSizeParams(AttackParams):
    """Steps and the step size: an expression in ``eps`` and ``steps`` (suite units), e.g. ``2.5*eps/steps``."""

    steps: int = Field(default=10, ge=1, le=MAX_STEPS)
    step_size: str | None = None  # None: the attack's default_step_size

    @field_validator("step_size", mode="before")
    @classmethod
    def _expression(cls, raw: Any) -> str | None:
        if raw is None:
            return None
        try:
            # Syntax only here: the value is checked at every real (eps, steps) of a suite entry.
            check_expr(raw, {"eps", "steps"})
        except UsageError as exc:
            raise ValueError(str(exc)) from None
        return str(raw)


def random_start_value(raw: Any) -> Any:
    """``true`` (uniform in the eps-ball), ``false``, or a radius >= 0 in the suite's units."""
    if raw is None or isinstance(raw, bool):
        return raw
    try:
        value = eval_expr(raw)
    except UsageError as exc:
        raise ValueError(str(exc)) from None
    if value < 0:
        raise ValueError("must be true, false or a radius >= 0")
    return value


class RandomStartParams(AttackParams):
    """A random start and restarts, read by the gradient loop."""

    # true: uniform in the eps-ball; a number: uniform in a ball of that radius (suite units;
    # the hierarchical-feature-alignment paper starts in U(-alpha, alpha)); false: at x.
    random_start: bool | float = True
    restarts: int = Field(default=1, ge=1, le=1000)

    @field_validator("random_start", mode="before")
    @classmethod
    def _start(cls, raw: Any) -> Any:
        return random_start_value(raw)


# What the loop keeps per slot beside the attack's own state: the sample's clean input and label, gathered
# once at admission rather than at every step, and in L-inf the projection's bounds.
CLEAN, LABEL, LOSS_LABEL, LOW, HIGH = "_clean", "_label", "_loss_label", "_low", "_high"
Projection = Callable[[torch.Tensor, torch.Tensor, Eps | None], torch.Tensor]  # an attack's project


class StepState(dict):
    """Per-sample tensors of the slots (kept aligned with the pool), the call's constants, and
    ``clean``: the slots' clean inputs (for projections)."""

    def __init__(self, radius: Eps, step_size: Eps, norm: str) -> None:
        super().__init__()
        self.radius = radius
        self.step_size = step_size
        self.norm = norm
        # Whether some slot is at step 0 of a restart (set by the loop before each ``step``); when none is, a
        # step may skip its tests of ``t == 0``.
        self.starting = True

    @property
    def clean(self) -> torch.Tensor | None:
        """The slots' clean inputs: kept per slot from admission on, aligned with the pool as the rest is."""
        return self.get(CLEAN)

    @clean.setter
    def clean(self, value: torch.Tensor) -> None:  # for a caller driving ``step`` itself
        self[CLEAN] = value

    def project(self, x_adv: torch.Tensor, projection: Projection) -> torch.Tensor:
        """``x_adv`` projected on the slots' threat model: ``projection`` (the attack's ``project``) of it.

        Where the loop keeps L-inf bounds per slot (the attack projects as the base does), one
        operation (a clamp between tensors) instead of five a projection: ``[x - eps, x + eps]`` within ``[0, 1]`` is
        ``[max(x - eps, 0), min(x + eps, 1)]``, and min and max are exact, so the result is the same."""
        if LOW in self:
            return torch.clamp(x_adv, self[LOW], self[HIGH])
        return projection(x_adv, self[CLEAN], self.radius)


class GradientAttack(Attack):
    """Ascends ``loss`` by gradient steps from ``init``, projecting every iterate."""

    family: ClassVar[Family] = "gradient"
    default_step_size: ClassVar[str] = "eps/steps"

    # -- what a subclass writes ------------------------------------------------------------------------------
    def init(self, x: torch.Tensor, start: Eps | None, sample_ids: torch.Tensor, restart: int) -> torch.Tensor:
        """Starting point of a restart (projected by the caller); ``start`` is the random-start radius or None."""
        if start is None:
            return x
        key = randomness.stream_key(self.seed, self.stream, restart)
        shape = tuple(x.shape[1:])
        if self.norm == "linf":
            u = randomness.uniform(sample_ids, shape, key, x.device).to(x.dtype)
            return x + (2.0 * u - 1.0) * start
        direction = randomness.normal(sample_ids, shape, key, x.device).to(x.dtype)
        direction = sign_or_normalized(direction, "l2")
        r = randomness.uniform(sample_ids, (1,), key ^ 0x5BD1E995, x.device).to(x.dtype)
        return x + direction * r.view(-1, *[1] * (x.dim() - 1)) * start

    def init_state(self, x_adv: torch.Tensor, state: StepState) -> dict[str, torch.Tensor]:
        """Per-sample tensors for new slots (one row per row of ``x_adv``); ``state`` holds the constants."""
        return {}

    def loss_labels(self, labels: torch.Tensor, rows: torch.Tensor, restart: torch.Tensor) -> torch.Tensor:
        """What the loss of the slots is computed against: their labels, by default.

        ``rows`` are the slots' positions in the inputs and ``restart`` their restart numbers, so a
        targeted attack can give each slot the target of its current restart. The loop asks when
        slots join and when they restart, and keeps the answer until the next restart. Whether a
        sample is fooled is always judged on its label.
        """
        return labels

    def gradient_passes(self) -> int:
        """Forward+backward passes per slot and step (``loss_and_grad`` may average several)."""
        return 1

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor, state: StepState,
             t: torch.Tensor) -> torch.Tensor:
        """The next iterate (projected by the caller); ``loss`` and ``t`` are per sample."""
        raise NotImplementedError

    # -- parameters read by the loop -------------------------------------------------------------------------
    def steps(self) -> int:
        return getattr(self.params, "steps", 1)

    def restarts(self) -> int:
        return getattr(self.params, "restarts", 1)

    @classmethod
    def cost(cls, params: AttackParams) -> Cost:
        return Cost(gradient=getattr(params, "steps", 1) * getattr(params, "restarts", 1), forward=1)

    @classmethod
    def step_size_at(cls, params: AttackParams, eps: float) -> float:
        """The step size in the suite's units at ``eps``."""
        text = getattr(params, "step_size", None) or cls.default_step_size
        return eval_expr(text, {"eps": eps, "steps": float(getattr(params, "steps", 1))})

    @classmethod
    def check_at(cls, params: AttackParams, eps: float) -> None:
        """A step size that is negative, or zero where eps is not, would hide the attack."""
        text = getattr(params, "step_size", None)
        if text is None:
            return  # the defaults are positive multiples of eps
        steps = getattr(params, "steps", 1)
        try:
            value = cls.step_size_at(params, eps)
        except UsageError as exc:
            raise ValueError(f"step_size: {exc} at eps {eps:g}, steps {steps}") from None
        # At eps 0 nothing may move, so a zero step is right there; anywhere else it hides the attack.
        if value < 0 or (value == 0 and eps > 0):
            raise ValueError(f"step_size: {text!r} is {value:g} at eps {eps:g}, steps {steps}; "
                             "it must be > 0")

    def start_radius(self, eps: float) -> float | bool | None:
        """The random start in suite units (True: the eps-ball) or None for none."""
        start = getattr(self.params, "random_start", None)
        if start is None or start is False:
            # An objective whose gradient vanishes at x itself starts one step away.
            return self.step_size_at(self.params, eps) if self.loss.needs_random_start else None
        return start

    def describe(self, eps: float | None) -> dict[str, Any]:
        at = self.required_eps(eps)
        start = self.start_radius(at)
        # The parameters as resolved at this eps (a step size as a number, in pixels).
        return {**super().describe(eps), "steps": self.steps(), "restarts": self.restarts(),
                "step_size": _recorded(self.radius(self.step_size_at(self.params, at), _CPU)),
                "random_start": False if start is None else
                (True if start is True else _recorded(self.radius(start, _CPU)))}

    # -- the loop --------------------------------------------------------------------------------------------
    def loss_and_grad(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            outputs = model(x)
            logits = outputs.detach()
            direct = self.loss.losses_and_output_grad(logits, y)
            if direct is None:
                losses = self.loss(outputs, y)
                (grad,) = torch.autograd.grad(losses.sum(), x)
            else:
                losses, output_grad = direct
                (grad,) = torch.autograd.grad(outputs, x, output_grad)
        return logits, losses.detach(), grad.detach()

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            context: RunContext) -> RunOutput:
        if self.loss.coupled:
            context = context.unsplit()  # the loss of each sample depends on its batch: never split it
        return context.drive(GradientSearch(self, model, x, y, self.required_eps(eps), context.sample_ids), x)


class GradientSearch(SlotSearch):
    """The gradient loop's per-slot logic: steps from each restart's start, any-iterate early stop.

    ``x_best`` holds each sample's answer: the iterate that fooled it, or else the last iterate of
    its latest restart; ``scored`` marks the samples whose ``x_best`` the loop saw fool the model.
    """

    def __init__(self, attack: GradientAttack, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 eps: float, sample_ids: torch.Tensor) -> None:
        self.attack, self.model, self.x, self.y, self.sample_ids = attack, model, x, y, sample_ids
        self.radius = attack.radius(eps, x)
        self.state = StepState(self.radius, attack.radius(attack.step_size_at(attack.params, eps), x), attack.norm)
        self.bounded = attack.norm == "linf" and type(attack).project is Attack.project
        start = attack.start_radius(eps)
        self.start = None if start is None else (self.radius if start is True else attack.radius(start, x))
        self.steps, self.restarts = attack.steps(), attack.restarts()
        self.any_iterate = not attack.final_iterate and attack.loss.scores
        self.x_best = x.clone()
        self.scored = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.gradient_evals = self.forward_evals = 0
        # Every sample's first starting point at once: one draw instead of one per admission.
        everyone = torch.arange(len(x), device=x.device)
        self.first = self.begin(everyone, torch.zeros_like(everyone))

    def begin(self, rows: torch.Tensor, restart: torch.Tensor) -> torch.Tensor:
        """Projected starting points; slots of one restart number share its random stream."""
        x = self.x
        xa = torch.empty_like(x[rows])
        for k in restart.unique().tolist():
            mine = restart == k
            xa[mine] = self.attack.init(x[rows[mine]], self.start, self.sample_ids[rows[mine]], k)
        return self.attack.project(xa, x[rows], self.radius)

    def slot_state(self) -> StepState:
        return self.state

    def fresh(self, rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        xa, x = self.first[rows], self.x[rows]
        labels = self.y[rows]
        kept = {CLEAN: x, LABEL: labels, LOSS_LABEL: self.attack.loss_labels(labels, rows, torch.zeros_like(rows))}
        if self.bounded:
            kept |= {LOW: (x - self.radius).clamp_min(0.0), HIGH: (x + self.radius).clamp_max(1.0)}
        return xa, self.attack.init_state(xa, self.state) | kept

    def restart(self, slots: Pool, which: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows, restart = slots.rows[which], slots.restart[which]
        xa = self.begin(rows, restart)
        return xa, self.attack.init_state(xa, self.state) | {
            LOSS_LABEL: self.attack.loss_labels(self.y[rows], rows, restart)}

    def step(self, slots: Pool) -> None:
        """A gradient pass at every slot's iterate; slots it fools leave (any-iterate), the others step."""
        attack, state = self.attack, self.state
        labels = state[LABEL]
        outputs, losses, grad = attack.loss_and_grad(self.model, slots.xa, state[LOSS_LABEL])
        passes = slots.size() * attack.gradient_passes()
        self.gradient_evals += passes
        attack.count_passes(passes)
        if self.any_iterate:
            # The fooled leave before the step: their answer is the iterate that fooled them.
            fooled = attack.loss.fooled(outputs, labels)
            if bool(fooled.any()):
                self.x_best[slots.rows[fooled]] = slots.xa[fooled]
                self.scored[slots.rows[fooled]] = True
                keep = ~fooled
                losses, grad = losses[keep], grad[keep]
                slots.keep(keep)
        if not slots.empty():
            state.starting = slots.starting
            slots.xa = state.project(attack.step(slots.xa, grad, losses, state, slots.t), attack.project)
        return None  # the fooled left above

    def end_restart(self, slots: Pool, ending: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Final iterates: the last restart's the base scores; earlier ones are scored here, the fooled leave."""
        rows, xa = slots.rows[ending], slots.xa[ending]
        # Unfooled samples keep their last iterate until a later restart does better.
        self.x_best[rows] = xa
        fooled = torch.zeros_like(ending)
        scoring = ending & ~last
        if bool(scoring.any()):
            rows, xa = slots.rows[scoring], slots.xa[scoring]
            if self.attack.loss.scores:
                fooled[scoring] = self.attack.loss.fooled(self.model(xa), self.y[rows])
            self.scored[rows[fooled[scoring]]] = True
            self.forward_evals += len(rows)
            self.attack.count_passes(0, len(rows))
        return fooled

    def output(self) -> RunOutput:
        # The loop scored only examples that fooled the model; the base scores the last iterates.
        return RunOutput(self.x_best, self.gradient_evals, self.forward_evals, scored=self.scored,
                         fooled=self.scored.clone())


_CPU = torch.empty(0)  # describes radii on the CPU, in float32 as the suites' tensors are


def _recorded(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [round(float(v), 8) for v in value.flatten()]
    return value
