"""Native gradient attacks: FGSM, BIM, PGD (L-inf and L2), MI-FGSM."""

from __future__ import annotations

from typing import Any

import torch

from robench.attacks import randomness
from robench.attacks.base import Attack, Eps, sign_or_normalized
from robench.attacks.registry import ATTACKS


class IterativeGradient(Attack):
    """x <- project(x + step_size * direction(grad)); optional random start.

    Without a step size, each step is ``step_ratio * eps / steps`` (the
    suites' defaults: eps/steps for BIM and MI-FGSM, 2.5*eps/steps for PGD).
    """

    step_ratio: float = 1.0

    def __init__(
        self,
        eps: Eps,
        *,
        step_size: Eps | None = None,
        random_start: bool | float | torch.Tensor = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(eps, **kwargs)
        self.step_size = step_size if step_size is not None else self.step_ratio * eps / self.steps
        self.random_start = random_start

    def init(self, x: torch.Tensor, sample_ids: torch.Tensor, restart: int) -> torch.Tensor:
        if self.random_start is False or self.random_start is None:
            return x
        # True: uniform in the eps-ball; a number: uniform in a ball of that radius
        # (the hierarchical-feature-alignment paper starts in U(-alpha, alpha)).
        radius = self.eps if self.random_start is True else self.random_start
        if isinstance(radius, torch.Tensor):
            radius = radius.to(device=x.device, dtype=x.dtype)
        key = self.random_key(restart)
        shape = tuple(x.shape[1:])
        if self.norm == "linf":
            u = randomness.uniform(sample_ids, shape, key, x.device).to(x.dtype)
            return x + (2.0 * u - 1.0) * radius
        direction = randomness.normal(sample_ids, shape, key, x.device).to(x.dtype)
        direction = sign_or_normalized(direction, "l2")
        r = randomness.uniform(sample_ids, (1,), key ^ 0x5BD1E995, x.device).to(x.dtype)
        return x + direction * r.view(-1, *[1] * (x.dim() - 1)) * radius

    def step(self, x_adv, grad, state, t):
        step = self.step_size
        if isinstance(step, torch.Tensor):
            step = step.to(device=x_adv.device, dtype=x_adv.dtype)
        return x_adv + step * sign_or_normalized(grad, self.norm)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info["step_size"] = _scalar(self.step_size)
        info["random_start"] = _scalar(self.random_start)
        return info


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [round(float(v), 8) for v in value.flatten()]
    return value


@ATTACKS.register("fgsm")
class FGSM(IterativeGradient):
    """One step of size eps (Goodfellow et al. 2015)."""

    name = "fgsm"

    def __init__(self, eps: Eps, **kwargs: Any) -> None:
        kwargs.pop("steps", None)
        kwargs.setdefault("step_size", eps)
        super().__init__(eps, steps=1, **kwargs)


@ATTACKS.register("bim")
class BIM(IterativeGradient):
    """Iterated FGSM clipped to the eps-ball, no random start (Kurakin et al. 2017)."""

    name = "bim"


@ATTACKS.register("pgd")
class PGD(IterativeGradient):
    """BIM from a random start in the eps-ball, with restarts (Madry et al. 2018)."""

    name = "pgd"
    step_ratio = 2.5  # Madry et al.: room to move across the ball from a random start

    def __init__(self, eps: Eps, *, random_start: bool | float | torch.Tensor = True, **kwargs: Any) -> None:
        super().__init__(eps, random_start=random_start, **kwargs)


@ATTACKS.register("mifgsm")
class MIFGSM(IterativeGradient):
    """Momentum iterative FGSM (Dong et al. 2018): accumulate L1-normalised gradients."""

    name = "mifgsm"

    def __init__(self, eps: Eps, *, decay: float = 1.0, **kwargs: Any) -> None:
        super().__init__(eps, **kwargs)
        self.decay = decay

    def init_state(self, x_adv):
        return {"momentum": torch.zeros_like(x_adv)}

    def step(self, x_adv, grad, state, t):
        l1 = grad.abs().flatten(1).mean(dim=1).view(-1, *[1] * (grad.dim() - 1))
        state["momentum"] = self.decay * state["momentum"] + grad / (l1 + 1e-12)
        return super().step(x_adv, state["momentum"], state, t)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "decay": self.decay}
