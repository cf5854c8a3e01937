"""``attack: pixels`` — random few-pixel changes as a (black-box, gradient-free) suite entry."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robench.attacks import randomness
from robench.attacks.base import Attack, AttackResult
from robench.attacks.registry import ATTACKS
from robench.pixels.perturb import change_pixels


def pixel_trials(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sample_ids: torch.Tensor,
    *,
    n_pixels: int,
    trials: int,
    key: int,
    **change: Any,
) -> torch.Tensor:
    """Bool [trials, N]: is each image misclassified after each trial's change.

    Trial t uses ``stream_key(key, t)``, so trials are independent draws and a
    result does not depend on how the images were batched.
    """
    out = torch.empty(trials, len(x), dtype=torch.bool, device=x.device)
    with torch.no_grad():
        for t in range(trials):
            changed = change_pixels(x, n_pixels, sample_ids=sample_ids, key=randomness.stream_key(key, t), **change)
            out[t] = model(changed).argmax(dim=1) != y
    return out


@ATTACKS.register("pixels")
class PixelChange(Attack):
    """Change ``n_pixels`` random pixels; a sample counts as fooled if any trial fools it.

    "Any trial" keeps the suite's worst-case semantics (an attacker may retry, and
    robust accuracy is accuracy under the worst perturbation tried); the
    ``pixel-index`` command reports per-trial rates instead, as the paper does.

    Trial t draws with ``stream_key(seed, stream, t)`` (``pixel_trials`` with key
    ``stream_key(seed, stream)`` derives exactly that), i.e. ``random_key(t)``.
    The norm is recorded as "l0": the budget is a count of changed pixels, and
    labelling the entry "linf" with eps 0 would misdescribe it in results.
    """

    name = "pixels"
    norms = ("l0",)  # a count of changed pixels, not an L-p ball

    def __init__(self, eps: Any = None, *, n_pixels: int = 4, delta: int | None = None,
                 area: tuple[int, int] | None = None, shared_positions: bool = False, channels: str = "all",
                 trials: int = 1, seed: int = 0, stream: int = 0, **_: Any) -> None:
        super().__init__(0.0, norm="l0", final_iterate=True, seed=seed, stream=stream)
        self.n_pixels = n_pixels
        self.change = {"delta": delta, "area": tuple(area) if area else None,
                       "shared_positions": shared_positions, "channels": channels}
        self.trials = trials

    def describe(self) -> dict[str, Any]:
        return {"pixels": self.n_pixels, "trials": self.trials, **self.change}

    @torch.no_grad()
    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 sample_ids: torch.Tensor | None = None) -> AttackResult:
        ids = torch.arange(len(x), device=x.device) if sample_ids is None else sample_ids.to(x.device)
        key = randomness.stream_key(self.seed, self.stream)
        success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        x_adv = x.clone()
        for t in range(self.trials):
            changed = change_pixels(x, self.n_pixels, sample_ids=ids, key=randomness.stream_key(key, t),
                                    **self.change)
            fooled = model(changed).argmax(dim=1) != y
            # Keep, per sample, the first trial that fooled it (unfooled ones end with the last trial's image).
            take = ~success if t == self.trials - 1 else fooled & ~success
            x_adv[take] = changed[take]
            success |= fooled
        return AttackResult(x_adv, success, gradient_evals=0, forward_evals=len(x) * self.trials)
