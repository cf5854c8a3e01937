"""The adversarial examples a run keeps (``--save-adversarial``): which samples, and their 8-bit roundings.

``robench.results.adversarial`` describes the rounding and writes the files; the run predicts the
rounded images while it still holds the model, so the rounding lives here, below both.
"""

from __future__ import annotations

import torch

STEP_TOLERANCE = 1e-4  # of one 1/255 step: float32 noise of an attack's projection, not a perturbation


def samples_to_keep(count: int, already: int, segment: int) -> int:
    """How many leading rows of a segment fall among the first ``count`` samples (0: all of them)."""
    if count == 0:
        return segment
    return max(0, min(segment, count - already))


def quantize_clean(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0,1] -> uint8, each value rounded to the nearest k/255."""
    return torch.round(x.detach().double() * 255.0).clamp_(0, 255).to(torch.uint8)


def quantize_adversarial(x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """The adversarial image in uint8: the saved clean image plus the perturbation rounded toward zero."""
    # float64: the difference of two float32 values is exact there.
    steps = (x_adv.detach().double() - x.detach().double()) * 255.0
    steps = torch.trunc(steps + torch.sign(steps) * STEP_TOLERANCE)
    return (quantize_clean(x).double() + steps).clamp_(0, 255).to(torch.uint8)


def as_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0,1], as the data loaders convert 8-bit images."""
    return images.float().div_(255.0)
