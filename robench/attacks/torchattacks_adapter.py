"""Any torchattacks attack as a suite entry: ``attack: ta.Square`` with its arguments under ``params:``.

torchattacks is an optional extra (it pins an old ``requests`` and ships a
top-level ``robustbench`` package). Its attacks draw from the global RNG, so
each batch runs inside ``torch.random.fork_rng`` with a seed derived from the
run's seed and the batch's first sample: the caller's global RNG state is left
untouched. Outcomes therefore depend on how samples are batched, unlike robench's
own attacks.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from robench.attacks import randomness
from robench.attacks.base import Attack, AttackParams, EpsBudget, Family, RunOutput
from robench.attacks.driver import RunContext
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


class TorchattacksParams(AttackParams):
    """The wrapped class's own constructor arguments (eps comes from the entry)."""

    params: dict[str, Any] = Field(default_factory=dict)
    accepted: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _accepted_by_the_class(self) -> "TorchattacksParams":
        unknown = sorted(set(self.params) - set(self.accepted))
        if unknown:
            raise ValueError(f"params: {', '.join(unknown)} not accepted; the class takes "
                             f"{', '.join(p for p in self.accepted if p not in ('self', 'model'))}")
        return self


class TorchattacksAttack(Attack):
    """Runs ``torchattacks.<name>`` batch by batch; the base checks and scores its output."""

    Params: ClassVar[type[TorchattacksParams]] = TorchattacksParams  # each bound class has its own subclass
    params: TorchattacksParams
    family: ClassVar[Family] = "external"  # its internals are not robench's to describe
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")
    eps_budget: ClassVar[EpsBudget] = "optional"  # e.g. ta.CW has no eps
    ta_class: ClassVar[Any] = None

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        if kwargs.get("eps_scale") is not None:
            raise UsageError(f"{self.name}: per-channel eps is not supported for torchattacks attacks")
        super().__init__(params, **kwargs)  # not a gradient loop of robench's: final-iterate (see the base)

    def describe(self, eps: float | None) -> dict[str, Any]:
        return {"norm": self.norm, **{k: v for k, v in self.params.params.items() if k != "eps"}}

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            context: RunContext) -> RunOutput:
        arguments = dict(self.params.params)
        if eps is not None and "eps" in self.Params.accepted:
            arguments["eps"] = float(eps)
        devices = [x.device.index or 0] if x.device.type == "cuda" else []

        def attack_batch(xs: torch.Tensor, ys: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            # The global RNG, seeded per batch and put back after: the caller's stream is untouched.
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(randomness.stream_key(self.seed, self.stream, int(ids[0])))
                attack = self.ta_class(model, **arguments)
                with torch.enable_grad():
                    return attack(xs, ys).detach().to(x.dtype)

        return RunOutput(context.in_batches(attack_batch, x, y, context.sample_ids))


def torchattacks_attack(name: str) -> type[Attack]:
    """The attack class for ``ta.<Name>``: the adapter bound to that torchattacks class."""
    ta = _torchattacks()
    short = name[len(PREFIX):] if name.startswith(PREFIX) else name
    names = torchattacks_names()
    if short not in names:
        raise UsageError(f"unknown torchattacks attack {PREFIX}{short}"
                         + did_you_mean(PREFIX + short, [PREFIX + n for n in names]))
    cls = getattr(ta, short)
    accepted = tuple(inspect.signature(cls.__init__).parameters)
    params = type(f"{short}Params", (TorchattacksParams,), {"accepted": accepted, "__module__": __name__})
    return type(f"Torchattacks{short}", (TorchattacksAttack,),
                {"name": PREFIX + short, "Params": params, "ta_class": cls, "__module__": __name__})
