"""Attacks: the base class, native gradient attacks and the torchattacks adapter."""

from robench.attacks.base import Attack, AttackResult
from robench.attacks.gradient import BIM, FGSM, MIFGSM, PGD
from robench.attacks.registry import ATTACKS

__all__ = ["ATTACKS", "Attack", "AttackResult", "BIM", "FGSM", "MIFGSM", "PGD"]
