"""Embeddings for re-identification: the model's output or a named layer, in [0,1] pixel space."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from robench.errors import RunError, UsageError
from robench.models.preprocessing import Normalization
from robench.registry import did_you_mean


class ReIDFeatures(nn.Module):
    """Image batch in [0,1] -> one feature vector per image, differentiable for attacks.

    ``layer`` takes the output of a named sub-module instead of the model's
    output; ``flip`` adds the features of the horizontally flipped image (the
    layumi baseline's test-time trick); ``l2`` normalises the result.
    """

    mean: torch.Tensor  # buffers, registered in __init__ with a normalization
    std: torch.Tensor

    def __init__(self, model: nn.Module, normalization: Normalization | None = None, *, layer: str | None = None,
                 flip: bool = False, l2: bool = False) -> None:
        super().__init__()
        self.model = model
        self.normalization = normalization
        self.layer = layer
        self.flip = flip
        self.l2 = l2
        if normalization is not None:
            self.register_buffer("mean", torch.tensor(normalization.mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(normalization.std).view(1, -1, 1, 1), persistent=False)
        self._module = None
        if layer is not None:
            modules = dict(model.named_modules())
            if layer not in modules:
                raise UsageError(f"--feature-layer {layer!r} is not a module of the model"
                                 + did_you_mean(layer, [n for n in modules if n]))
            self._module = modules[layer]

    def pixel_std(self) -> torch.Tensor:
        """Per-channel std, used to convert eps from normalised to pixel units."""
        return self.std.view(-1, 1, 1) if self.normalization is not None else torch.ones(1, 1, 1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.normalization is not None:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self._module is None:
            return _as_features(self.model(x))
        captured: list[torch.Tensor] = []
        handle = self._module.register_forward_hook(lambda m, i, o: captured.append(_first_tensor(o)))
        try:
            self.model(x)
        finally:
            handle.remove()
        return captured[-1].flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.embed(x)
        if self.flip:
            feats = feats + self.embed(x.flip(3))
        if self.l2:
            feats = F.normalize(feats, dim=1)
        return feats


def _first_tensor(out: object) -> torch.Tensor:
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        for key in ("features", "feat", "embedding", "logits"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
        raise RunError(f"the model returned a dict without features (keys: {', '.join(map(str, out))})")
    if isinstance(out, torch.Tensor):
        return out
    raise RunError(f"the model returned {type(out).__name__}, not a feature tensor")


def _as_features(out: object) -> torch.Tensor:
    feats = _first_tensor(out)
    return feats.flatten(1) if feats.dim() > 2 else feats


@torch.no_grad()
def extract(features: nn.Module, batches, device: torch.device,
            transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Features of every batch ``(x, pid, index)``; ``transform(x, index)`` may replace x (adversarial)."""
    parts = []
    for x, _, idx in batches:
        x = x.to(device, non_blocking=True)
        if transform is not None:
            x = transform(x, idx)
        parts.append(features(x).float())
    if not parts:
        raise UsageError("no images to extract features from")
    return torch.cat(parts)
