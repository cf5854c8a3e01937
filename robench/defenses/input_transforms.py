"""Input-transform defences: a fixed, non-differentiable transform applied to the image before the model.

Such defences (bit-depth reduction, JPEG compression) were proposed because they "remove" small
perturbations; most of their apparent robustness comes from stopping the gradients of attacks.
:class:`Quantize`'s gradient is zero almost everywhere and :class:`JPEG`'s output is not connected to
its input at all, so a gradient attack against :class:`InputDefended` reports an upper bound only.
BPDA (``bpda:`` in a suite entry, ``--bpda`` on the command line; see docs/guide/bpda.md) attacks them
by differentiating through an approximation of the transform instead.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


class Quantize(nn.Module):
    """Bit-depth reduction: each value of an input in [0, 1] rounded to one of ``2**bits`` levels.

    Args:
        bits: bits per value kept (1 to 16); 4 keeps 16 levels.

    The output equals the input's level exactly where the input already lies on the grid; the
    gradient of ``torch.round`` is zero everywhere, so gradient attacks see no input gradient.
    """

    def __init__(self, bits: int = 4) -> None:
        super().__init__()
        if int(bits) != bits or not 1 <= bits <= 16:
            raise ValueError(f"bits must be an integer from 1 to 16, got {bits!r}")
        self.bits = int(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = 2**self.bits - 1
        return torch.round(x * top) / top

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class Detach(nn.Module):
    """Gradient masking at its plainest: the input, cut from autograd (``x.detach()``).

    Not a defence: the model behind it is exactly as robust as without it, yet gradient attacks see
    no input gradient and report an accuracy close to the clean one. What the sanity report's
    ``no_input_gradient`` flag and ``robench check-attack`` are there to catch.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()


class JPEG(nn.Module):
    """JPEG compression of each image of an NCHW batch in [0, 1] (1 or 3 channels), at ``quality``.

    Args:
        quality: JPEG quality from 1 (strongest compression) to 100.

    Images are rounded to 8-bit and compressed on the CPU; the result comes back as floats in
    [0, 1] on the input's device and dtype. The output is a new tensor, not connected to the input
    through autograd: a gradient attack gets no input gradient at all.
    """

    def __init__(self, quality: int = 75) -> None:
        super().__init__()
        if int(quality) != quality or not 1 <= quality <= 100:
            raise ValueError(f"quality must be an integer from 1 to 100, got {quality!r}")
        self.quality = int(quality)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"JPEG expects NCHW images with 1 or 3 channels, got shape {tuple(x.shape)}")
        pixels = (x.detach().clamp(0, 1) * 255).round().to(device="cpu", dtype=torch.uint8)
        decoded = torch.stack(self._compress(list(pixels)))
        return (decoded.to(torch.float32) / 255).to(device=x.device, dtype=x.dtype)

    def _compress(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        from torchvision.io import decode_jpeg, encode_jpeg

        # torchvision >= 0.29 warns on every call that its codecs move to TorchCodec; the functions
        # still work, and a warning per batch would drown an evaluation's output.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
            # Lists go through in one call each: several times faster than an image at a time.
            return decode_jpeg(encode_jpeg([image.contiguous() for image in images], quality=self.quality))

    def extra_repr(self) -> str:
        return f"quality={self.quality}"


class InputDefended(nn.Module):
    """``model(transform(x))``: a classifier behind an input transform.

    Args:
        transform: the input transform, e.g. :class:`Quantize` or :class:`JPEG`.
        model: the classifier it protects.

    The submodules are named ``transform`` and ``model`` (``model.<layer>`` for the classifier's
    layers), the names a suite's ``bpda:`` list and ``--bpda`` use.
    """

    def __init__(self, transform: nn.Module, model: nn.Module) -> None:
        super().__init__()
        self.transform = transform
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.transform(x))
