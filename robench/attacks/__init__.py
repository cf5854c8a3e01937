"""Attacks: one class per file, the base contract, the slot driver, objectives and the registry.

Every built-in attack class is importable from here, e.g. ``from robench.attacks import PGD, Square``.
"""

from __future__ import annotations

import importlib
from typing import Any

from robench.attacks import randomness
from robench.attacks.base import Attack, AttackParams, AttackResult, Cost, RunOutput
from robench.attacks.bim import BIM
from robench.attacks.driver import PartialRun, RunContext, SlotSearch
from robench.attacks.fgsm import FGSM
from robench.attacks.gradient import GradientAttack, StepSizeParams, StepState
from robench.attacks.mifgsm import MIFGSM
from robench.attacks.objectives import CrossEntropy, Objective
from robench.attacks.pgd import PGD
from robench.attacks.registry import ATTACKS, register_attack

# Imported on first use: some of these modules import packages (robench.pixels, robench.reid) that
# themselves import robench.attacks, which an eager import here would turn into a cycle.
_ON_FIRST_USE = {
    "APGD": "robench.attacks.apgd",
    "APGDCE": "robench.attacks.apgd",
    "APGDDLR": "robench.attacks.apgd",
    "APGDTargeted": "robench.attacks.apgd_targeted",
    "AutoAttack": "robench.attacks.autoattack",
    "FAB": "robench.attacks.fab_untargeted",
    "FABTargeted": "robench.attacks.fab",
    "FMN": "robench.attacks.fmn",
    "GeneratorAttack": "robench.attacks.dmr",
    "PixelChange": "robench.attacks.pixels",
    "Square": "robench.attacks.square",
}


def __getattr__(name: str) -> Any:
    if name in _ON_FIRST_USE:
        return getattr(importlib.import_module(_ON_FIRST_USE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_ON_FIRST_USE))


__all__ = ["APGD", "APGDCE", "APGDDLR", "APGDTargeted", "ATTACKS", "Attack", "AttackParams", "AttackResult",
           "AutoAttack", "BIM", "Cost", "CrossEntropy", "FAB", "FABTargeted", "FGSM", "FMN", "GeneratorAttack",
           "GradientAttack", "MIFGSM", "Objective", "PGD", "PartialRun", "PixelChange", "RunContext",
           "RunOutput", "SlotSearch", "Square", "StepSizeParams", "StepState", "randomness",
           "register_attack"]
