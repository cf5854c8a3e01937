"""Suite entries: one (attack, eps) cell of a suite, with its attack ready to call.

An entry is configuration only; what a run counts for it lives in ``robench.evaluation.state``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from robench.attacks import Attack, AttackParams, Objective
from robench.errors import UsageError
from robench.suites import AttackSpec, Suite


@dataclass
class Entry:
    """One cell of the suite: one result row. ``eps`` is in the suite's units (None: no eps)."""

    spec: AttackSpec
    index: int  # position among all entries: keys the random stream
    eps: float | None
    eps_text: str
    attack: Attack

    def params(self) -> dict[str, Any]:
        # bpda only where the entry has it: the parameters of other entries stay as they always were.
        bpda = {"bpda": [spec.model_dump(mode="json") for spec in self.spec.bpda]} if self.spec.bpda else {}
        return {"eps_expr": self.eps_text if self.eps is not None else None,
                "final_iterate": self.attack.final_iterate, **self.attack.describe(self.eps), **bpda}

    def __call__(self, model, x, y, sample_ids, *, batch_size: int, refill: bool = True, unbounded: bool = False):
        """The attack at the entry's eps; ``unbounded``: without one (a minimum-norm attack's smallest examples)."""
        eps = None if unbounded else self.eps
        return self.attack(model, x, y, eps, sample_ids, batch_size=batch_size, refill=refill)


def build_entries(suite: Suite, model, seed: int,
                  loss_for: Callable[[AttackSpec], Objective | None] | None = None) -> list[Entry]:
    """One entry per eps of each attack (per value of its sweep, e.g. pixel counts, for budget-free ones).

    ``loss_for`` gives the objective of an attack entry (re-identification); default: cross-entropy.
    """
    std = model.pixel_std() if suite.eps_space == "normalized" else None
    if std is not None and model.normalization is None:
        raise UsageError(
            f"suite {suite.name} gives eps in normalised units: the model needs --normalize or --mean/--std"
        )
    scale = std.detach().cpu() if std is not None else None
    entries: list[Entry] = []
    for spec in suite.attacks:
        cls = spec.attack_class
        loss = loss_for(spec) if loss_for else None
        for settings, eps, text in _cells(spec, cls):
            budget = cls.eps_budget != "none"  # a pixel count has no eps to convert
            attack = cls(settings, norm=spec.norm if budget else None, final_iterate=spec.final_iterate, loss=loss,
                         eps_scale=scale if budget else None, seed=seed, stream=len(entries))
            entries.append(Entry(spec, len(entries), eps, text, attack))
    return entries


def _cells(spec: AttackSpec, cls: type[Attack]) -> list[tuple[AttackParams, float | None, str]]:
    """(parameters, eps, eps as written) of each result row of one suite entry."""
    sweep = getattr(cls, "sweep", None)
    if sweep:
        return [(spec.settings.model_copy(update={sweep: [value]}), None, cls.sweep_label(value))
                for value in getattr(spec.settings, sweep)]
    eps_values: Sequence[float | None] = spec.eps or [None]  # no eps: one row without one
    return [(spec.settings, eps, text) for eps, text in zip(eps_values, spec.eps_text or [""])]


def entry_weights(suite: Suite) -> list[float]:
    """Relative time per sample of each entry, in the order ``build_entries`` makes them, from the
    attacks' costs: a backward pass counted as two forward passes (what progress ETAs weigh)."""
    weights = []
    for spec in suite.attacks:
        cost = spec.attack_class.cost(spec.settings)
        weight, cells = float(max(1, 3 * cost.gradient + cost.forward)), len(_cells(spec, spec.attack_class))
        if spec.attack_class.minimum_norm:  # one search serves every eps: the others only read its norms
            weights += [weight] + [1.0] * (cells - 1)
        else:
            weights += [weight] * cells
    return weights
