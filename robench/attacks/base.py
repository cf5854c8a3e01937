"""The attack contract: an attack writes ``run``; the base's final ``__call__`` does the rest.

An attack is one class in one file. It declares

* ``name`` and its parameters as a pydantic model (``Params``: defaults, bounds,
  unknown fields refused), which the suite schema validates an entry against;
* its traits: ``family`` (gradient, query, transfer, generator, or external for
  wrapped third-party code), the threat models it supports (``norms``), whether it
  takes an eps (``eps_budget``) and its ``cost`` per sample (gradient and forward
  passes as a function of its parameters);
* whether it is a minimum-norm attack (``minimum_norm``): called without an eps, it returns
  per sample the smallest adversarial example it found (the clean input where it found none),
  and the base measures each returned example (``AttackResult.norms``).

eps is an argument of each call, not of the attack: one attack object serves a
whole eps sweep. Whatever ``run`` returns, ``__call__`` checks that it lies in the
threat model (an attack returning points outside it is an error naming the attack),
projects away float rounding, and scores every output on the model, as Foolbox 3's
final ``__call__`` does: the reported success is that of the returned examples.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any, Callable, ClassVar, Literal, final, overload

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from robench.attacks.driver import PartialRun, RunContext
from robench.attacks.objectives import CrossEntropy, Objective
from robench.errors import RunError, UsageError

Eps = float | torch.Tensor  # a radius in pixel units: a scalar, or per-channel radii of shape (C, 1, 1)
Family = Literal["gradient", "query", "transfer", "generator", "external"]
EpsBudget = Literal["required", "optional", "none"]

# Points this far outside the threat model are float rounding (projected away); farther is an error.
ROUNDING = 1e-5


class AttackParams(BaseModel):
    """Base of every attack's parameter model: unknown fields are refused, values must be finite."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


@dataclass(frozen=True)
class Cost:
    """Passes through the model per attacked sample and eps, at most (early stop only lowers them)."""

    gradient: int = 0  # forward + backward
    forward: int = 0  # forward only (queries)


@dataclass
class AttackResult:
    x_adv: torch.Tensor
    success: torch.Tensor  # bool per sample: the model is fooled by x_adv (scored by the base)
    gradient_evals: int = 0  # forward+backward passes, counted per sample
    forward_evals: int = 0  # forward-only passes, counted per sample (the base's scoring pass included)
    found_by: torch.Tensor | None = None  # composite attacks: per sample, the index of the part that fooled it, or -1
    # Minimum-norm attacks: per sample, the size of the returned perturbation in the attack's norm (float64,
    # pixel units) where it fools the model, inf where it does not; 0 for an input misclassified already.
    norms: torch.Tensor | None = None


@dataclass
class RunOutput:
    """What ``run`` returns: the examples and the passes it made.

    A run that has already put a returned example through the model (the gradient loop
    has, for the iterate that fooled a sample) may say so: ``scored`` marks those samples
    and ``fooled`` holds the verdicts. The base scores every other output.
    """

    x_adv: torch.Tensor
    gradient_evals: int = 0
    forward_evals: int = 0
    scored: torch.Tensor | None = None
    fooled: torch.Tensor | None = None
    found_by: torch.Tensor | None = None  # composite attacks: the part (index into ``parts()``) per sample, or -1


class AttackInterrupted(KeyboardInterrupt):
    """Ctrl-C during an attack call: ``result`` is scored for the samples ``done`` marks (the others are not
    meaningful), so a caller keeps what finished and attacks only the rest again."""

    def __init__(self, done: torch.Tensor, result: AttackResult) -> None:
        super().__init__("interrupted")
        self.done, self.result = done, result


class Attack:
    """Base class of every attack. Subclasses set the class attributes and write ``run``."""

    name: ClassVar[str] = "attack"
    Params: ClassVar[type[AttackParams]] = AttackParams
    family: ClassVar[Family] = "gradient"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    eps_budget: ClassVar[EpsBudget] = "required"
    sweep: ClassVar[str | None] = None  # without an eps: the list parameter whose values give one result each
    # Called without an eps, returns each sample's smallest adversarial example found: one run gives the
    # robust accuracy at every eps (the engine reads a suite entry's eps from the measured norms).
    minimum_norm: ClassVar[bool] = False

    def __init__(
        self,
        params: AttackParams | dict[str, Any] | None = None,
        *,
        norm: str | None = None,
        final_iterate: bool = False,
        loss: Objective | None = None,
        eps_scale: torch.Tensor | None = None,
        seed: int = 0,
        stream: int = 0,
        **fields: Any,
    ) -> None:
        """``params`` (or its fields as keywords) are validated by ``Params``.

        ``eps_scale`` (per channel, shape (C, 1, 1)) converts eps and other radii given in
        the suite's units to pixels: the L-inf ball of radius r in z-score space is a box
        of radius r*std_c in pixels. ``loss`` is what gradient attacks ascend
        (cross-entropy on the label by default) and what says whether a sample is fooled.
        """
        self.params = self.validate_params(params, fields)
        norm = norm or self.norms[0]
        if norm not in self.norms:
            raise UsageError(f"{self.name} supports norm {' or '.join(self.norms)}, not {norm!r}")
        if eps_scale is not None and norm != "linf":
            raise UsageError("per-channel eps (normalised eps space) is only defined for linf")
        self.norm = norm
        self.loss = loss or CrossEntropy()
        # Without a per-sample "fooled" (a ranking), only the final iterate can count; attacks
        # that are not gradient loops return one final example anyway.
        self.final_iterate = final_iterate or not self.loss.scores or self.family != "gradient"
        self.eps_scale = eps_scale
        self.seed = seed
        self.stream = stream
        # Where an attack with parts says how far it got (a composite after each member); set by
        # whoever runs it, e.g. the command line's progress. Lines only: results never depend on it.
        self.log: Callable[[str], None] | None = None
        # Hears (gradient, forward) passes per sample as a loop makes them: what moves a progress bar
        # within an attack call. Set by whoever runs it; results never depend on it.
        self.meter: Callable[[int, int], None] | None = None

    def count_passes(self, gradient: int, forward: int = 0) -> None:
        """Tell the meter (if any) about passes just made, counted per sample."""
        if self.meter is not None:
            self.meter(gradient, forward)

    @classmethod
    def validate_params(cls, params: AttackParams | dict[str, Any] | None, fields: dict[str, Any]) -> AttackParams:
        if isinstance(params, cls.Params) and not fields:
            return params
        given = dict(params.model_dump(exclude_unset=True) if isinstance(params, BaseModel) else params or {})
        try:
            return cls.Params.model_validate({**given, **fields})
        except Exception as exc:  # pydantic's ValidationError, one line for the user
            raise UsageError(f"{cls.name}: {first_error(exc)}") from None

    # -- traits ----------------------------------------------------------------------------------------------
    @classmethod
    def cost(cls, params: AttackParams) -> Cost:
        """Passes per sample and eps for these parameters (what --compile auto and progress weigh)."""
        return Cost(gradient=1)

    @classmethod
    def family_label(cls) -> str:
        """The family as listings show it (the default members, for a composite)."""
        return cls.family

    @classmethod
    def sweep_label(cls, value: Any) -> str:
        """How a value of the ``sweep`` parameter is written in tables (as eps is for the others)."""
        return str(value)

    @classmethod
    def check_at(cls, params: AttackParams, eps: float) -> None:
        """Raise ``ValueError("field: problem")`` if the parameters make no sense at ``eps`` (suite units)."""

    @classmethod
    def iterative(cls) -> bool:
        """Several gradient steps at the default parameters: the attacks a weaker one must not beat."""
        return cls.family == "gradient" and cls.cost(cls.Params()).gradient > 1

    # -- what a subclass writes ------------------------------------------------------------------------------
    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            context: RunContext) -> RunOutput:
        """Adversarial examples for ``x`` (the base checks, projects and scores them).

        ``context`` holds the samples' ids (``context.sample_ids``, what keys their randomness) and
        the call's batching: ``context.in_batches`` sends the model a batch at a time,
        ``context.drive`` runs a slot search (:mod:`robench.attacks.driver`).
        """
        raise NotImplementedError

    def describe(self, eps: float | None) -> dict[str, Any]:
        """The parameters as results.json records them, at the entry's eps (suite units)."""
        return {"norm": self.norm, **self.params.model_dump(mode="json")}

    def parts(self) -> list[str]:
        """The attacks a composite attack runs one after the other (empty for a single attack)."""
        return []

    def effective_eps(self, eps: float | None) -> float | None:
        """The eps a call with ``eps`` runs at (an attack with an optional budget may have its own)."""
        return eps

    # -- machinery -------------------------------------------------------------------------------------------
    def required_eps(self, eps: float | None) -> float:
        """``eps`` for a ``run`` that cannot go without one. The base passes ``run`` the effective eps, checked
        against ``eps_budget``, so None reaches here only where a subclass lifted a "required" budget."""
        if eps is None:
            raise UsageError(f"{self.name} needs an eps")
        return eps

    @overload
    def radius(self, eps: float, x: torch.Tensor) -> Eps: ...
    @overload
    def radius(self, eps: None, x: torch.Tensor) -> None: ...
    @overload
    def radius(self, eps: float | None, x: torch.Tensor) -> Eps | None: ...

    def radius(self, eps: float | None, x: torch.Tensor) -> Eps | None:
        """eps in pixel units, on ``x``'s device."""
        if eps is None:
            return None
        if self.eps_scale is None:
            return eps
        return eps * self.eps_scale.to(device=x.device, dtype=x.dtype)

    def project(self, x_adv: torch.Tensor, x: torch.Tensor, radius: Eps | None) -> torch.Tensor:
        """Nearest point of the eps-ball around ``x`` that is also in [0,1]."""
        if radius is not None and self.norm == "linf":
            # min/max rather than x + clamp(x_adv - x): no rounding from the subtraction,
            # so iterates equal the reference implementations bit for bit.
            x_adv = torch.minimum(torch.maximum(x_adv, x - radius), x + radius)
        elif radius is not None and self.norm == "l2":
            delta = x_adv - x
            norms = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
            factor = torch.clamp(radius / (norms + 1e-12), max=1.0)
            x_adv = x + delta * factor
        return x_adv.clamp(0.0, 1.0)

    @final
    @torch.no_grad()
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None = None,
                 sample_ids: torch.Tensor | None = None, *, batch_size: int | None = None,
                 refill: bool = True) -> AttackResult:
        """Attack ``x`` at ``eps`` (suite units); every output is checked, projected and scored.

        ``batch_size`` bounds the samples sent to the model at once (default: all); ``refill`` lets
        an attack that retires samples early give their slots to the next ones.
        """
        eps = self._check_eps(eps)
        ids = torch.arange(len(x), device=x.device) if sample_ids is None else sample_ids.to(x.device)
        context = RunContext(ids, batch_size=batch_size or len(x), refill=refill, seed=self.seed,
                             stream=self.stream)
        if len(x) == 0:
            empty = torch.zeros(0, dtype=torch.float64, device=x.device) if self.minimum_norm else None
            return AttackResult(x.clone(), torch.zeros(0, dtype=torch.bool, device=x.device), norms=empty)
        try:
            out = self._run(model, x, y, eps, context)
        except PartialRun as partial:
            raise self._interrupted(model, x, y, eps, partial, context) from partial.__cause__
        return self._checked(model, x, y, eps, out, context)

    def _run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
             context: RunContext) -> RunOutput:
        """``run``, called the old way where a plugin still writes ``run(..., sample_ids, batch_size, refill)``."""
        if not takes_legacy_arguments(type(self).run):
            return self.run(model, x, y, eps, context)
        # A plugin's run of the old signature takes other arguments than the one declared here.
        legacy_run: Callable[..., RunOutput] = self.run
        # stacklevel: past this method, __call__ and torch.no_grad's wrapper, to whoever called the attack.
        warnings.warn(f"{type(self).__name__}.run(model, x, y, eps, sample_ids, batch_size, refill) is deprecated: "
                      "write run(model, x, y, eps, context) and batch through the context (context.in_batches, "
                      "context.drive)", DeprecationWarning, stacklevel=4)
        return legacy_run(model, x, y, eps, *context.legacy_arguments())

    def _checked(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None, out: RunOutput,
                 context: RunContext) -> AttackResult:
        """``run``'s output in the threat model and scored (what every call returns)."""
        x_adv, moved = self._into_threat_model(out.x_adv, x, eps)
        known = torch.zeros(len(x), dtype=torch.bool, device=x.device) if out.scored is None else out.scored & ~moved
        success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        if out.fooled is not None:
            success[known] = out.fooled[known]
        scored = self._score(model, x_adv, y, ~known, success, context)
        found_by = None
        if out.found_by is not None:  # a part counts only where the returned example fools the model
            found = out.found_by.to(x.device)
            found_by = torch.where(success, found, torch.full_like(found, -1))
        norms = self.perturbation_norms(x_adv, x, success) if self.minimum_norm else None
        return AttackResult(x_adv, success, out.gradient_evals, out.forward_evals + scored, found_by, norms)

    def perturbation_norms(self, x_adv: torch.Tensor, x: torch.Tensor, success: torch.Tensor) -> torch.Tensor:
        """Per sample, the returned perturbation's size in the attack's norm where it fools the model, else inf.

        In float64 from the exact difference of the two images: a suite's eps is compared with these
        numbers as they are written to results.json, so a reader recomputing a curve gets the same counts.
        """
        delta = (x_adv.double() - x.double()).flatten(1)
        size = delta.abs().amax(dim=1) if self.norm == "linf" else delta.norm(dim=1)
        return torch.where(success, size, torch.full_like(size, float("inf")))

    def _interrupted(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
                     partial: PartialRun, context: RunContext) -> AttackInterrupted:
        """The finished rows of an interrupted call, checked and scored as a whole call's would be."""
        done, out = partial.done.to(x.device), partial.output
        rows = torch.nonzero(done).squeeze(1)

        def part(value: torch.Tensor | None) -> torch.Tensor | None:
            return None if value is None else value[rows]

        finished = self._checked(model, x[rows], y[rows], eps, RunOutput(
            out.x_adv[rows], out.gradient_evals, out.forward_evals, part(out.scored), part(out.fooled),
            part(out.found_by)), context)
        x_adv, success = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        x_adv[rows], success[rows] = finished.x_adv, finished.success
        found_by = norms = None
        if finished.found_by is not None:
            found_by = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
            found_by[rows] = finished.found_by
        if finished.norms is not None:
            norms = torch.full((len(x),), float("inf"), dtype=torch.float64, device=x.device)
            norms[rows] = finished.norms
        return AttackInterrupted(done, AttackResult(x_adv, success, finished.gradient_evals, finished.forward_evals,
                                                    found_by, norms))

    def _check_eps(self, eps: float | None) -> float | None:
        if isinstance(eps, torch.Tensor):
            raise UsageError(f"{self.name}: eps is a number in the suite's units; per-channel radii come from "
                             "eps_scale")
        if self.eps_budget == "required" and eps is None:
            raise UsageError(f"{self.name} needs an eps")
        if self.eps_budget == "none" and eps is not None:
            raise UsageError(f"{self.name} takes no eps")
        if eps is not None and (eps < 0 or eps != eps):
            raise UsageError(f"{self.name}: eps must be >= 0, got {eps}")
        return self.effective_eps(eps)

    def _into_threat_model(self, x_adv: torch.Tensor, x: torch.Tensor,
                           eps: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The examples, rows outside by rounding projected, and which rows moved."""
        if x_adv.shape != x.shape:
            raise RunError(f"{self.name} returned shape {tuple(x_adv.shape)} for inputs of shape {tuple(x.shape)}")
        x_adv = x_adv.to(x.dtype)
        excess = self.violation(x_adv, x, eps)
        if bool((excess > ROUNDING).any()):
            worst = int(excess.argmax())
            raise RunError(f"{self.name} returned sample {worst} outside its threat model ({self.norm}, eps "
                           f"{eps}): {float(excess[worst]):.3g} beyond the allowed change or [0,1]")
        # Project only rows outside by rounding (projecting a point inside could still nudge it, in L2), and
        # report the rows whose values changed: their earlier verdicts no longer apply.
        outside = excess > 0
        moved = torch.zeros_like(outside)
        if bool(outside.any()):
            x_adv = x_adv.clone()
            rows = torch.nonzero(outside).squeeze(1)
            projected = self.project(x_adv[rows], x[rows], self.radius(eps, x[rows]))
            moved[rows] = (projected != x_adv[rows]).flatten(1).any(dim=1)
            x_adv[rows] = projected
        return x_adv, moved

    def violation(self, x_adv: torch.Tensor, x: torch.Tensor, eps: float | None) -> torch.Tensor:
        """Per sample: how far ``x_adv`` lies outside the threat model (0 inside)."""
        box = torch.maximum(-x_adv, x_adv - 1).flatten(1).amax(dim=1).clamp_min(0)
        radius = self.radius(eps, x)
        if radius is None:
            return box
        delta = x_adv - x
        if self.norm == "linf":
            ball = (delta.abs() - radius).flatten(1).amax(dim=1).clamp_min(0)
        else:
            ball = (delta.flatten(1).norm(dim=1) - radius).clamp_min(0)
        return torch.maximum(box, ball)

    def _score(self, model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, todo: torch.Tensor,
               success: torch.Tensor, context: RunContext) -> int:
        """Fooled or not for the examples ``todo``, into ``success``; returns the forward passes made.

        Objectives without a per-sample "fooled" (a ranking) leave everything False.
        """
        if not self.loss.scores:
            return 0
        rows = torch.nonzero(todo).squeeze(1)
        if len(rows):
            success[rows] = context.in_batches(lambda part: self.loss.fooled(model(x_adv[part]), y[part]), rows)
        return len(rows)


def within_eps(out: RunOutput, x: torch.Tensor, inside: torch.Tensor) -> RunOutput:
    """A minimum-norm attack's answer at an eps: the smallest example counts only ``inside`` the eps-ball;
    elsewhere the sample gets its clean input back and is not fooled."""
    out.x_adv = torch.where(inside.view(-1, *[1] * (x.dim() - 1)), out.x_adv, x)
    out.fooled = out.fooled & inside if out.fooled is not None else None
    return out


def check_minimum_norm_options(attack: Attack) -> None:
    """What a minimum-norm attack cannot honour: another objective, last-iterate semantics, per-channel eps."""
    if not isinstance(attack.loss, CrossEntropy):
        raise UsageError(f"{attack.name} attacks classifiers; this run gives its own objective")
    if attack.final_iterate:
        raise UsageError(f"{attack.name} keeps the smallest adversarial iterate it finds; final_iterate does not "
                         "apply")
    if attack.eps_scale is not None:
        raise UsageError(f"{attack.name} measures perturbations in pixel units; give the suite's eps in pixel "
                         "units (eps_space: pixel)")


@cache
def takes_legacy_arguments(run: Callable[..., Any]) -> bool:
    """Whether ``run`` has the signature plugins wrote before the context:
    ``run(self, model, x, y, eps, sample_ids, batch_size, refill)``, seven arguments after ``self``."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    parameters = list(inspect.signature(run).parameters.values())
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in parameters):
        return False
    return sum(p.kind in kinds for p in parameters) == 8


def first_error(exc: Exception) -> str:
    """``field: problem`` for a pydantic ValidationError's first error; anything else is raised again."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        raise exc
    first = errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg'].removeprefix('Value error, ')}"


def sign_or_normalized(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit size for the norm."""
    if norm == "linf":
        return grad.sign()
    norms = grad.flatten(1).norm(dim=1).view(-1, *[1] * (grad.dim() - 1))
    return grad / (norms + 1e-12)
