"""The normalising wrapper every attack sees: pixels in [0,1] in, logits out."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from robench.errors import RunError, UsageError
from robench.models.preprocessing import Normalization

_LOGIT_KEYS = ("logits", "logit", "out", "output", "scores")


class RobustModel(nn.Module):
    """Wraps a classifier so its input is an image batch in [0,1].

    Normalisation lives here, so every attack works in pixel units, and
    tuple/dict outputs are reduced to one logits tensor (or refused).
    """

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, model: nn.Module, normalization: Normalization | None = None) -> None:
        super().__init__()
        self.model = model
        self.normalization = normalization
        if normalization is not None:
            mean = torch.tensor(normalization.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(normalization.std, dtype=torch.float32).view(1, -1, 1, 1)
        else:
            mean, std = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return with_input_gradient(logits_from(self.model(self.normalize(x))), x)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0,1] to what the wrapped model expects."""
        if self.normalization is None:
            return x
        if self.mean.shape[1] not in (1, x.shape[1]):
            raise UsageError(f"normalisation has {self.mean.shape[1]} channels but the images have {x.shape[1]}")
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def has_input_gradient(self, x: torch.Tensor) -> bool:
        """Whether the model's own output is connected to its input through autograd.

        Asked of the unwrapped model: :meth:`forward` hides a missing connection.
        Normalisation runs inside ``enable_grad`` too, so a caller's ``no_grad`` cannot cut the path.
        """
        x = x.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            return bool(logits_from(self.model(self.normalize(x))).requires_grad)

    def pixel_std(self) -> torch.Tensor:
        """Per-channel std, used to convert eps from normalised to pixel units."""
        return self.std.view(-1, 1, 1)


def with_input_gradient(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Connect a model's output to its input when the model cut the connection.

    A forward that takes an argmax, calls ``.detach()`` or runs under
    ``torch.no_grad()`` returns logits that do not require grad, and gradient
    attacks would crash on them. Adding ``0 * sum(x)`` leaves every value as it
    is but gives the output a gradient path whose input gradient is exactly
    zero, so such attacks run (and take no step); the sanity report says so.
    """
    if torch.is_grad_enabled() and x.requires_grad and not out.requires_grad:
        return out + x.sum() * 0
    return out


def logits_from(out: object) -> torch.Tensor:
    """Reduce a model's output to a [N, classes] tensor or fail clearly."""
    if isinstance(out, (tuple, list)):
        if not out or not isinstance(out[0], torch.Tensor):
            raise RunError("the model returned a tuple/list whose first element is not a tensor")
        out = out[0]
    elif isinstance(out, dict):
        key = next((k for k in _LOGIT_KEYS if k in out), None)
        if key is None:
            raise RunError(
                "the model returned a dict without a logits entry "
                f"(keys: {', '.join(map(str, out))}; expected one of {', '.join(_LOGIT_KEYS)})"
            )
        out = out[key]
    elif hasattr(out, "logits") and isinstance(getattr(out, "logits"), torch.Tensor):
        out = out.logits  # e.g. HuggingFace ImageClassifierOutput
    if not isinstance(out, torch.Tensor):
        raise RunError(f"the model returned {type(out).__name__}, not a tensor of logits")
    if out.dim() != 2:
        raise UsageError(wrong_shape_message(out))
    return out


def wrong_shape_message(out: torch.Tensor) -> str:
    return (f"the model returned shape {tuple(out.shape)}; robench needs one logit per class, "
            "shape (batch, classes)")


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and frozen parameters for the duration; both restored after.

    Parameters never need gradients for input-space attacks, and leaving
    them on would make every backward pass also compute weight gradients.
    """
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in grads:
            p.requires_grad_(flag)
