"""AutoAttack (Croce & Hein 2020): a fixed ensemble of attacks, each run on the points still robust.

The versions follow the reference implementation (fra31/auto-attack):

* ``standard``: APGD-CE (100 steps, 1 restart), APGD-T (9 target classes, 100 steps each),
  FAB-T (9 target classes, 100 steps) and Square (5,000 proposals after its start: ``queries``
  5001), in this order;
* ``plus``: APGD-CE and APGD-DLR with 5 restarts, Square, APGD-T and FAB-T. The reference
  also runs untargeted FAB with 5 restarts between APGD-DLR and Square; robench has no
  untargeted FAB, so ``plus`` leaves it out (recorded in ``params.members``);
* ``rand``: APGD-CE and APGD-DLR with Expectation over Transformation (20 draws per step),
  for randomised defences.

Each member is robench's own attack with the reference defaults (``robench attacks`` lists
them); ``members`` overrides a member's parameters (e.g. fewer Square queries for a quick
look), ``attacks`` runs a subset in the version's order. A point counts as broken by the
first member that finds an adversarial example for it within the threat model; the part
that broke each point is recorded (``found_by``), which gives AutoAttack's log (robust
accuracy after each member) in results.json.

Every member draws its randomness from its own stream, keyed by the entry and the member's
position, so runs are batch-size invariant and resumable like every robench attack.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar, Literal, cast

import torch
from pydantic import Field, model_validator
from torch import nn

from robench.attacks import randomness
from robench.attacks.base import (Attack, AttackInterrupted, AttackParams, AttackResult, Cost, Family, PartialRun,
                                  RunOutput, first_error)
from robench.attacks.driver import RunContext
from robench.attacks.objectives import CrossEntropy
from robench.errors import UsageError

# The reference's Square (n_queries 5000) queries its start and then makes 5,000 proposals;
# robench's ``queries`` counts every query, the start included.
REFERENCE_SQUARE = {"queries": 5001}
# Per version: (member, its settings beside its own defaults), in the order they run.
VERSIONS: dict[str, tuple[tuple[str, dict[str, Any]], ...]] = {
    "standard": (("apgd-ce", {}), ("apgd-t", {}), ("fab-t", {}), ("square", REFERENCE_SQUARE)),
    "plus": (("apgd-ce", {"restarts": 5}), ("apgd-dlr", {"restarts": 5}), ("square", REFERENCE_SQUARE),
             ("apgd-t", {}), ("fab-t", {})),
    "rand": (("apgd-ce", {"eot": 20}), ("apgd-dlr", {"eot": 20})),
}


class AutoAttackParams(AttackParams):
    version: Literal["standard", "plus", "rand"] = "standard"
    attacks: list[str] | None = Field(default=None, min_length=1)  # a subset of the version's members
    members: dict[str, dict[str, Any]] = Field(default_factory=dict)  # member -> parameter overrides

    @model_validator(mode="after")
    def _known_members(self) -> "AutoAttackParams":
        names = [name for name, _ in VERSIONS[self.version]]
        for field, given in (("attacks", self.attacks or []), ("members", list(self.members))):
            unknown = [n for n in given if n not in names]
            if unknown:
                raise ValueError(f"{field}: {', '.join(map(repr, unknown))} not in version {self.version} "
                                 f"({', '.join(names)})")
        if self.attacks is not None and len(set(self.attacks)) != len(self.attacks):
            raise ValueError("attacks: a member is listed twice")
        member_classes(self)  # the overrides must be valid parameters of their member
        return self


def member_classes(params: AutoAttackParams) -> list[tuple[str, type[Attack], AttackParams]]:
    """(name, class, validated parameters) of the members that run, in order."""
    from robench.attacks.registry import ATTACKS  # the registry lists this module: import it late

    chosen = set(params.attacks) if params.attacks is not None else None
    members: list[tuple[str, type[Attack], AttackParams]] = []
    for name, settings in VERSIONS[params.version]:
        if chosen is not None and name not in chosen:
            continue
        cls = ATTACKS.get(name)
        try:
            members.append((name, cls, cls.Params(**{**settings, **params.members.get(name, {})})))
        except Exception as exc:  # pydantic's ValidationError: name the member and its field
            raise ValueError(f"members.{name}.{first_error(exc)}") from None
    return members


class AutoAttack(Attack):
    name: ClassVar[str] = "autoattack"
    Params: ClassVar[type[AttackParams]] = AutoAttackParams
    params: AutoAttackParams
    # Its members are white-box gradient attacks first: it is judged as one (a black-box entry
    # beating it is a masking flag), and its own black-box member is checked from its log.
    family: ClassVar[Family] = "gradient"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")

    @classmethod
    def family_label(cls) -> str:
        families = dict.fromkeys(member.family for _, member, _ in cls._members(cls.Params()))
        return "composite: " + " + ".join(families)

    def __init__(self, params: AttackParams | dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        if not isinstance(self.loss, CrossEntropy):
            raise UsageError("autoattack evaluates classifiers; this run gives its own objective")
        self.members = [cls(settings, stream=randomness.stream_key(self.stream, k), norm=self.norm,
                            eps_scale=self.eps_scale, seed=self.seed)
                        for k, (_, cls, settings) in enumerate(member_classes(self.params))]

    @classmethod
    def _members(cls, params: AttackParams) -> list[tuple[str, type[Attack], AttackParams]]:
        """``member_classes`` for parameters the traits are asked about: always the class's own Params."""
        return member_classes(cast(AutoAttackParams, params))

    @classmethod
    def cost(cls, params: AttackParams) -> Cost:
        costs = [member.cost(settings) for _, member, settings in cls._members(params)]
        return Cost(gradient=sum(c.gradient for c in costs), forward=sum(c.forward for c in costs))

    @classmethod
    def check_at(cls, params: AttackParams, eps: float) -> None:
        for name, member, settings in cls._members(params):
            try:
                member.check_at(settings, eps)
            except ValueError as exc:
                raise ValueError(f"members.{name}.{exc}") from None

    def parts(self) -> list[str]:
        return [member.name for member in self.members]

    def describe(self, eps: float | None) -> dict[str, Any]:
        members = {}
        for member in self.members:
            described = member.describe(eps)
            described.pop("norm", None)
            members[member.name] = described
        return {"norm": self.norm, "version": self.params.version, "attacks": self.parts(), "members": members}

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            context: RunContext) -> RunOutput:
        x_adv = x.clone()
        found_by = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
        evals = [0, 0]  # gradient and forward passes of the members
        started = time.perf_counter()
        k, rows = 0, found_by[:0]
        try:
            for k, member in enumerate(self.members):
                member.meter = self.meter
                rows = torch.nonzero(found_by < 0).squeeze(1)
                if not len(rows):
                    break
                # Through the member's own call: it checks and scores its examples, batched as this call is.
                result = context.delegate(member, model, x, y, eps, rows)
                self._take(result, rows, k, x_adv, found_by, evals)
                if self.log:  # as the reference prints: robust so far after each member, and the time
                    robust = int((found_by < 0).sum())
                    self.log(f"after {member.name}: {robust} of {len(x)} attacked samples still robust "
                             f"({time.perf_counter() - started:.1f} s)")
        except KeyboardInterrupt as exc:
            raise self._partial(exc, rows, k, x_adv, found_by, evals) from exc
        return self._output(x_adv, found_by, evals)

    @staticmethod
    def _take(result: AttackResult, rows: torch.Tensor, k: int, x_adv: torch.Tensor, found_by: torch.Tensor,
              evals: list[int]) -> None:
        """Member ``k``'s successes on ``rows`` become the examples of those samples."""
        broken = rows[result.success]
        x_adv[broken] = result.x_adv[result.success]
        found_by[broken] = k
        evals[0] += result.gradient_evals
        evals[1] += result.forward_evals

    def _partial(self, exc: KeyboardInterrupt, rows: torch.Tensor, k: int, x_adv: torch.Tensor,
                 found_by: torch.Tensor, evals: list[int]) -> PartialRun:
        """Ctrl-C: a sample is finished once some member fooled it, or when the last member finished it."""
        last_done = torch.zeros_like(found_by, dtype=torch.bool)
        if isinstance(exc, AttackInterrupted):  # inside member k: keep what it finished
            done_rows = rows[exc.done]
            kept = AttackResult(exc.result.x_adv[exc.done], exc.result.success[exc.done],
                                exc.result.gradient_evals, exc.result.forward_evals)
            self._take(kept, done_rows, k, x_adv, found_by, evals)
            if k == len(self.members) - 1:
                last_done[done_rows] = True
        return PartialRun((found_by >= 0) | last_done, self._output(x_adv, found_by, evals))

    @staticmethod
    def _output(x_adv: torch.Tensor, found_by: torch.Tensor, evals: list[int]) -> RunOutput:
        # The members scored their own outputs; the points no member broke are returned unchanged
        # (as the reference does) and the base scores them.
        fooled = found_by >= 0
        return RunOutput(x_adv, evals[0], evals[1], scored=fooled, fooled=fooled.clone(), found_by=found_by)
