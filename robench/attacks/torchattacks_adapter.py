"""Any torchattacks attack as a suite entry: ``attack: ta.Square``.

torchattacks is an optional extra (it pins an old ``requests`` and ships a
top-level ``robustbench`` package). Its attacks draw from the global RNG, so
each call runs inside ``torch.random.fork_rng`` with a seed derived from
the run's seed: the caller's global RNG state is left untouched.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from robench.attacks.base import Attack, AttackResult, Eps
from robench.errors import UsageError
from robench.registry import did_you_mean

PREFIX = "ta."


def _torchattacks():
    try:
        import torchattacks
    except ImportError:
        raise UsageError(
            "ta.* attacks need torchattacks: pip install 'robench[torchattacks]'"
        ) from None
    return torchattacks


def torchattacks_names() -> list[str]:
    ta = _torchattacks()
    return sorted(
        n for n in dir(ta)
        if inspect.isclass(getattr(ta, n)) and issubclass(getattr(ta, n), ta.attack.Attack)
        and n not in ("Attack", "MultiAttack", "VANILA")
    )


class TorchattacksAttack(Attack):
    """Runs ``torchattacks.<name>`` and scores its final output per sample."""

    def __init__(self, ta_name: str, eps: Eps | None, *, norm: str = "linf", params: dict[str, Any] | None = None,
                 seed: int = 0, stream: int = 0, **_: Any) -> None:
        ta = _torchattacks()
        names = torchattacks_names()
        if ta_name not in names:
            raise UsageError(f"unknown torchattacks attack {PREFIX}{ta_name}"
                             + did_you_mean(PREFIX + ta_name, [PREFIX + n for n in names]))
        self.cls = getattr(ta, ta_name)
        self.name = PREFIX + ta_name
        self.params = dict(params or {})
        accepted = inspect.signature(self.cls.__init__).parameters
        unknown = sorted(set(self.params) - set(accepted))
        if unknown:
            raise UsageError(
                f"{self.name} takes no parameter(s) {', '.join(unknown)}; "
                f"it takes {', '.join(p for p in accepted if p not in ('self', 'model'))}"
            )
        if isinstance(eps, torch.Tensor) and eps.numel() > 1:
            raise UsageError(f"{self.name}: per-channel eps is not supported for torchattacks attacks")
        if eps is not None and "eps" in accepted:
            self.params["eps"] = float(eps)
        super().__init__(float(eps or 0.0), norm=norm, final_iterate=True, seed=seed, stream=stream)

    def describe(self) -> dict[str, Any]:
        return {"norm": self.norm, **{k: v for k, v in self.params.items() if k != "eps"}}

    @torch.no_grad()
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 sample_ids: torch.Tensor | None = None) -> AttackResult:
        devices = [x.device.index or 0] if x.device.type == "cuda" else []
        first_id = int(sample_ids[0]) if sample_ids is not None and len(sample_ids) else 0
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.random_key(first_id))
            attack = self.cls(model, **self.params)
            with torch.enable_grad():
                x_adv = attack(x, y).detach()
        success = model(x_adv).argmax(dim=1) != y
        return AttackResult(x_adv, success, gradient_evals=0, forward_evals=len(x))
