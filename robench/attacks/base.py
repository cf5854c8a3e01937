"""The attack base class: an attack writes its step, the base does the rest.

The base handles projection to the eps-ball and to [0,1], per-sample
success, early stopping of samples already fooled (they stop costing
compute), restarts, and the bookkeeping of which iterate counts:

* any-iterate (default): a sample fooled at *any* iterate counts as fooled
  and that iterate is kept as its adversarial example (AutoAttack's rule);
* final-iterate (``final_iterate=True``): only the last iterate of a restart
  counts, as torchattacks and most papers report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from robench.attacks import randomness
from robench.errors import UsageError

Eps = float | torch.Tensor  # a scalar, or per-channel radii of shape (C, 1, 1)


@dataclass
class AttackResult:
    x_adv: torch.Tensor
    success: torch.Tensor  # bool per sample: the model is fooled by x_adv
    gradient_evals: int = 0  # forward+backward passes, counted per sample
    forward_evals: int = 0  # forward-only passes, counted per sample


class Attack:
    """Base class for attacks that follow gradients of a loss in input space."""

    name: ClassVar[str] = "attack"
    norms: ClassVar[tuple[str, ...]] = ("linf", "l2")

    def __init__(
        self,
        eps: Eps,
        *,
        norm: str = "linf",
        steps: int = 1,
        restarts: int = 1,
        final_iterate: bool = False,
        seed: int = 0,
        stream: int = 0,
    ) -> None:
        if norm not in self.norms:
            raise UsageError(f"{self.name} supports norm {' or '.join(self.norms)}, not {norm!r}")
        if norm == "l2" and isinstance(eps, torch.Tensor) and eps.numel() > 1:
            raise UsageError("per-channel eps (normalised eps space) is only defined for linf")
        if steps < 1:
            raise UsageError(f"{self.name}: steps must be >= 1, got {steps}")
        if restarts < 1:
            raise UsageError(f"{self.name}: restarts must be >= 1, got {restarts}")
        self.eps = eps
        self.norm = norm
        self.steps = steps
        self.restarts = restarts
        self.final_iterate = final_iterate
        self.seed = seed
        self.stream = stream

    # -- hooks for subclasses -------------------------------------------------
    def init(self, x: torch.Tensor, sample_ids: torch.Tensor, restart: int) -> torch.Tensor:
        """Starting point of a restart (projected by the base)."""
        return x

    def init_state(self, x_adv: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample state carried across steps (compacted with the batch)."""
        return {}

    def step(self, x_adv: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], t: int) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Summed, not averaged: a mean over a large batch shrinks each sample's
        # gradient by 1/N and underflows in fp16.
        return F.cross_entropy(logits.float(), y, reduction="sum")

    def describe(self) -> dict[str, Any]:
        return {"norm": self.norm, "steps": self.steps, "restarts": self.restarts}

    # -- machinery ------------------------------------------------------------
    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Nearest point of the eps-ball around ``x`` that is also in [0,1]."""
        eps = self._eps_on(x)
        if self.norm == "linf":
            # min/max rather than x + clamp(x_adv - x): no rounding from the subtraction,
            # so iterates equal the reference implementations bit for bit.
            x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
        else:
            delta = x_adv - x
            norms = delta.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
            factor = torch.clamp(eps / (norms + 1e-12), max=1.0)
            x_adv = x + delta * factor
        return x_adv.clamp(0.0, 1.0)

    def _eps_on(self, x: torch.Tensor) -> Eps:
        if isinstance(self.eps, torch.Tensor):
            return self.eps.to(device=x.device, dtype=x.dtype)
        return self.eps

    def random_key(self, restart: int) -> int:
        return randomness.stream_key(self.seed, self.stream, restart)

    def loss_and_grad(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            loss = self.loss(logits, y)
            (grad,) = torch.autograd.grad(loss, x)
        return logits.detach(), grad.detach()

    def is_fooled(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return logits.argmax(dim=1) != y

    @torch.no_grad()
    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, sample_ids: torch.Tensor | None = None
    ) -> AttackResult:
        n = len(x)
        if sample_ids is None:
            sample_ids = torch.arange(n)
        sample_ids = sample_ids.to(x.device)
        x_best = x.clone()
        success = torch.zeros(n, dtype=torch.bool, device=x.device)
        grad_evals = fwd_evals = 0
        for restart in range(self.restarts):
            active = torch.nonzero(~success).squeeze(1)
            if active.numel() == 0:
                break
            x0, y0 = x[active], y[active]
            xa = self.project(self.init(x0, sample_ids[active], restart), x0)
            state = self.init_state(xa)
            for t in range(self.steps):
                logits, grad = self.loss_and_grad(model, xa, y0)
                grad_evals += len(xa)
                if not self.final_iterate:
                    fooled = self.is_fooled(logits, y0)
                    if fooled.any():
                        success[active[fooled]] = True
                        x_best[active[fooled]] = xa[fooled]
                        keep = ~fooled
                        active, x0, y0, xa, grad = active[keep], x0[keep], y0[keep], xa[keep], grad[keep]
                        state = {k: v[keep] for k, v in state.items()}
                        if active.numel() == 0:
                            break
                xa = self.project(self.step(xa, grad, state, t), x0)
            if active.numel() == 0:
                continue
            fooled = self.is_fooled(model(xa), y0)
            fwd_evals += len(xa)
            success[active[fooled]] = True
            # Unfooled samples keep their last iterate: the strongest point we have.
            x_best[active] = xa
        return AttackResult(x_best, success, grad_evals, fwd_evals)


def sign_or_normalized(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction of unit size for the norm."""
    if norm == "linf":
        return grad.sign()
    norms = grad.flatten(1).norm(dim=1).view(-1, *[1] * (grad.dim() - 1))
    return grad / (norms + 1e-12)
