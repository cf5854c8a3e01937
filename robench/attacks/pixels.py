"""``attack: pixels``: random few-pixel changes, a gradient-free suite entry (the pixel-change paper).

The budget is a count of changed pixels (threat model l0), not an eps: a suite entry
lists counts (``pixels: [4, 8]``) and gets one result per count. A sample counts as
fooled if any of its ``trials`` random changes fools the model: the suite's
worst-case semantics (an attacker may retry); ``robench pixel-index`` reports
per-trial rates instead, as the paper does.

Trial t draws with ``stream_key(stream_key(seed, stream), t)``, keyed by the sample's
index: a result does not depend on how the images were batched.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, cast

import torch
from pydantic import Field, field_validator
from torch import nn

from robench.attacks import randomness
from robench.attacks.base import Attack, AttackParams, Cost, EpsBudget, Family, RunOutput
from robench.attacks.driver import RunContext
from robench.pixels.perturb import MAX_TRIALS, change_pixels

DEFAULT_PIXELS = [4, 8, 16, 32, 64]


class PixelParams(AttackParams):
    pixels: list[int] = Field(default_factory=lambda: list(DEFAULT_PIXELS))
    delta: int | None = Field(default=None, ge=0, le=255)  # None: any new value in [0,255]
    area: list[int] | None = None  # a centred rows x cols rectangle the positions are drawn from
    trials: int = Field(default=1, ge=1, le=MAX_TRIALS)
    shared_positions: bool = False
    channels: Literal["all", "first"] = "all"

    @field_validator("pixels", mode="before")
    @classmethod
    def _pixel_counts(cls, raw: Any) -> Any:
        raw = raw if isinstance(raw, list) else [raw]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in raw):
            raise ValueError("pixel counts must be positive integers")
        return raw

    @field_validator("area", mode="before")
    @classmethod
    def _area(cls, raw: Any) -> Any:
        if raw is None:
            return raw
        raw = [raw, raw] if isinstance(raw, int) else raw
        if not isinstance(raw, list) or len(raw) != 2 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in raw
        ):
            raise ValueError("area is a side length or [rows, cols] of positive integers")
        return raw


class PixelChange(Attack):
    name: ClassVar[str] = "pixels"
    Params: ClassVar[type[AttackParams]] = PixelParams
    params: PixelParams
    family: ClassVar[Family] = "query"
    norms: ClassVar[tuple[str, ...]] = ("l0",)  # a count of changed pixels, not an L-p ball
    eps_budget: ClassVar[EpsBudget] = "none"
    sweep: ClassVar[str | None] = "pixels"  # one suite entry per pixel count

    @classmethod
    def cost(cls, params: AttackParams) -> Cost:
        return Cost(forward=cast(PixelParams, params).trials)  # cost is asked of the class's own Params

    @classmethod
    def sweep_label(cls, value: Any) -> str:
        return f"{value}px"

    @property
    def n_pixels(self) -> int:
        return self.params.pixels[0]

    def _change(self) -> dict[str, Any]:
        p = self.params
        return {"delta": p.delta, "area": tuple(p.area) if p.area else None, "shared_positions": p.shared_positions,
                "channels": p.channels}

    def describe(self, eps: float | None) -> dict[str, Any]:
        return {"pixels": self.n_pixels, "trials": self.params.trials, **self._change()}

    def run(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float | None,
            context: RunContext) -> RunOutput:
        # A batch of images at a time through all its trials.
        x_adv, fooled = context.in_batches(lambda *part: self._trials(model, *part), x, y, context.sample_ids)
        # Every returned image is one the model was shown: the trials' verdicts are its score.
        return RunOutput(x_adv, forward_evals=len(x) * self.params.trials,
                         scored=torch.ones_like(fooled), fooled=fooled)

    def _trials(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = randomness.stream_key(self.seed, self.stream)
        success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        x_adv = x.clone()
        last = self.params.trials - 1
        for t in range(self.params.trials):
            changed = change_pixels(x, self.n_pixels, sample_ids=ids, key=randomness.stream_key(key, t),
                                    **self._change())
            fooled = self.loss.fooled(model(changed), y)
            # Keep, per sample, the first trial that fooled it (unfooled ones end with the last trial's image).
            take = ~success if t == last else fooled & ~success
            x_adv[take] = changed[take]
            success |= fooled
        return x_adv, success

    def violation(self, x_adv: torch.Tensor, x: torch.Tensor, eps: float | None) -> torch.Tensor:
        """Changed pixel positions beyond the count, on the 8-bit grid the changes are made on."""
        box = super().violation(x_adv, x, None)
        moved = (torch.round(x_adv * 255) != torch.round(x * 255)).any(dim=1).flatten(1).sum(dim=1)
        return torch.maximum(box, (moved - self.n_pixels).clamp_min(0).to(box.dtype))
