"""Suite entries: one (attack, eps) cell of a suite, built into a ready attack.

An entry is configuration only; what a run counts for it lives in ``robench.run_state``.
"""

from __future__ import annotations

from dataclasses import dataclass

from robench.attacks import ATTACKS, Attack
from robench.attacks.torchattacks_adapter import PREFIX as TA_PREFIX
from robench.attacks.torchattacks_adapter import TorchattacksAttack
from robench.errors import UsageError
from robench.suites import AttackSpec, Suite


@dataclass
class Entry:
    """One (attack, eps) cell of the suite: one result row."""

    spec: AttackSpec
    index: int  # position among all entries: keys the random stream
    eps: float | None  # None for attacks without a budget (e.g. ta.CW)
    eps_text: str
    attack: Attack

    def params(self) -> dict:
        info = {"eps_expr": self.eps_text if self.eps is not None else None, "final_iterate": self.attack.final_iterate, **self.attack.describe()}
        return info


def build_entries(suite: Suite, model, seed: int) -> list[Entry]:
    entries: list[Entry] = []
    std = model.pixel_std() if suite.eps_space == "normalized" else None
    if std is not None and model.normalization is None:
        raise UsageError(
            f"suite {suite.name} gives eps in normalised units: the model needs --normalize or --mean/--std"
        )
    for spec in suite.attacks:
        if spec.attack == "pixels":
            for count in spec.pixel_counts():
                entries.append(_pixel_entry(spec, len(entries), count, seed))
            continue
        eps_list = spec.eps or [None]
        texts = spec.eps_text or [""]
        for eps, text in zip(eps_list, texts):
            entries.append(_entry(spec, len(entries), eps, text, std, seed))
    return entries


def _entry(spec: AttackSpec, index: int, eps: float | None, text: str, std, seed: int) -> Entry:
    def to_pixels(value: float):
        # An L-inf ball of radius r in z-score space is a box of radius r*std_c in pixels.
        return value * std.detach().cpu() if std is not None else value

    common = {"seed": seed, "stream": index}
    if spec.attack.startswith(TA_PREFIX):
        attack: Attack = TorchattacksAttack(
            spec.attack[len(TA_PREFIX):], None if eps is None else to_pixels(eps),
            norm=spec.norm, params=spec.params, **common,
        )
    elif spec.attack == "dmr":
        attack = ATTACKS.get("dmr")(None if eps is None else to_pixels(eps), generator=spec.generator, **common)
    else:
        cls = ATTACKS.get(spec.attack)
        kwargs = {"norm": spec.norm, "final_iterate": spec.final_iterate, **common}
        if spec.attack != "fgsm":
            kwargs["steps"] = spec.resolved_steps()
            kwargs["step_size"] = to_pixels(spec.step_size_for(eps))
        if spec.random_start is not None:
            rs = spec.random_start
            kwargs["random_start"] = rs if isinstance(rs, bool) else to_pixels(float(rs))
        if spec.restarts is not None:
            kwargs["restarts"] = spec.restarts
        if spec.decay is not None:
            kwargs["decay"] = spec.decay
        attack = cls(to_pixels(eps), **kwargs)
    return Entry(spec, index, eps, text, attack)


def _pixel_entry(spec: AttackSpec, index: int, count: int, seed: int) -> Entry:
    cls = ATTACKS.get("pixels")
    attack = cls(n_pixels=count, delta=spec.delta, area=spec.area, shared_positions=bool(spec.shared_positions),
                 channels=spec.channels or "all", trials=spec.trials or 1, seed=seed, stream=index)
    return Entry(spec, index, None, f"{count}px", attack)
