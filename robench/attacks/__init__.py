"""Attacks: one class per file, the base contract, gradient loop, objectives and the registry."""

from robench.attacks.base import Attack, AttackParams, AttackResult, Cost, RunOutput
from robench.attacks.bim import BIM
from robench.attacks.fgsm import FGSM
from robench.attacks.gradient import GradientAttack, StepSizeParams, StepState
from robench.attacks.mifgsm import MIFGSM
from robench.attacks.objectives import CrossEntropy, Objective
from robench.attacks.pgd import PGD
from robench.attacks.registry import ATTACKS, register_attack

__all__ = ["ATTACKS", "Attack", "AttackParams", "AttackResult", "BIM", "Cost", "CrossEntropy", "FGSM",
           "GradientAttack", "MIFGSM", "Objective", "PGD", "RunOutput", "StepSizeParams", "StepState",
           "register_attack"]
