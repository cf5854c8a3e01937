"""Local Feature Masking (LFM): random rectangles of a few feature maps set to a random value.

Gong et al., "Beyond Dropout: Local Feature Masking", Algorithm 1. In training, a sample is masked
with probability ``p``; then ``N`` distinct channels of its feature maps are picked at random, and
in each a rectangle of random area and aspect ratio is filled with one random value. The paper
inserts the layer after ResNet-50's conv1 block (64 maps of 128x64 for a 256x128 input) and finds
p = 15 % and N = 32 of the 64 channels best (Figs. 2-3); the rectangle parameters follow local
grayscale transformation / random erasing: S_l = 0.03, S_h = 0.4, r_1 = 0.3, r_2 = 1/r_1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Candidate rectangles drawn at once per (sample, channel): Algorithm 1's "while True" redraw,
# vectorised. With the default ranges almost every draw fits; 16 makes a miss vanishingly rare.
CANDIDATES = 16


def _check_range(name: str, bounds: tuple[float, float], low: float, high: float | None) -> tuple[float, float]:
    lo, hi = float(bounds[0]), float(bounds[1])
    upper_ok = high is None or hi <= high
    # Written so that NaN fails every comparison, and infinity fails "finite".
    if not (lo > low and lo <= hi and upper_ok and math.isfinite(hi)):
        limit = f"{low} < lo <= hi" + (" (finite)" if high is None else f" <= {high}")
        raise ValueError(f"{name} must be a (lo, hi) pair with {limit}, got {bounds!r}")
    return lo, hi


def check_area(area: tuple[float, float]) -> tuple[float, float]:
    """(S_l, S_h): fractions of the map's area, 0 < S_l <= S_h <= 1 (the layer and recipes check the same)."""
    return _check_range("area", area, 0.0, 1.0)


def check_aspect(aspect: tuple[float, float]) -> tuple[float, float]:
    """(r_1, r_2): height/width ratios, 0 < r_1 <= r_2."""
    return _check_range("aspect", aspect, 0.0, None)


class LocalFeatureMasking(nn.Module):
    """Local Feature Masking (Algorithm 1 of Gong et al.); the identity in eval mode.

    Args:
        p: probability that a sample's feature maps are masked at all (paper: 15 %).
        channels: how many distinct channels of a masked sample get a rectangle (paper's N: 32 of
            64); capped at the input's channel count.
        area: (S_l, S_h), the rectangle's area as a fraction of H*W.
        aspect: (r_1, r_2), the rectangle's height/width ratio (drawn uniformly, as ``Rand``).
        value: range of the fill value, one per masked channel (paper: ``Rand(0, 1)``).
        generator: source of randomness (on the input's device); the global RNG when ``None``.

    Rectangle sizes are H_e = round(sqrt(S_e * r_e)) and W_e = round(sqrt(S_e / r_e)); a size that
    does not fit the map is redrawn, and the top-left corner is then uniform over the positions
    where the rectangle fits. Algorithm 1 instead draws the corner in the whole map and redraws
    size and corner together when the rectangle overflows, which also rejects many large
    rectangles; this layer keeps the drawn size distribution, as random erasing does.

    The layer has no parameters and no buffers, so it never changes a checkpoint.
    """

    def __init__(
        self,
        p: float = 0.15,
        channels: int = 32,
        area: tuple[float, float] = (0.03, 0.4),
        aspect: tuple[float, float] = (0.3, 1 / 0.3),
        value: tuple[float, float] = (0.0, 1.0),
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p is a probability and must lie in [0, 1], got {p}")
        if int(channels) != channels or channels < 1:
            raise ValueError(f"channels must be an integer >= 1, got {channels}")
        self.p = float(p)
        self.channels = int(channels)
        self.area = check_area(area)
        self.aspect = check_aspect(aspect)
        if not float(value[0]) <= float(value[1]):
            raise ValueError(f"value must be a (lo, hi) pair with lo <= hi, got {value!r}")
        self.value = (float(value[0]), float(value[1]))
        self.generator = generator

    def extra_repr(self) -> str:
        return f"p={self.p}, channels={self.channels}, area={self.area}, aspect={self.aspect}, value={self.value}"

    def _uniform(self, shape: tuple[int, ...], bounds: tuple[float, float], device: torch.device) -> torch.Tensor:
        lo, hi = bounds
        return lo + (hi - lo) * torch.rand(shape, generator=self.generator, device=device)

    def _chosen_channels(self, n: int, c: int, device: torch.device) -> torch.Tensor:
        """(N, C) bool: which channels get a rectangle. Per masked sample min(channels, C) distinct ones."""
        masked_sample = torch.rand(n, generator=self.generator, device=device) < self.p
        # The first k of a random permutation are k distinct channels drawn uniformly.
        order = torch.rand(n, c, generator=self.generator, device=device).argsort(dim=1)
        chosen = torch.zeros(n, c, dtype=torch.bool, device=device)
        chosen.scatter_(1, order[:, : min(self.channels, c)], True)
        return chosen & masked_sample[:, None]

    def _rectangle_sizes(
        self, n: int, c: int, h: int, w: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) heights and widths: the first of CANDIDATES draws that fits in the H x W map."""
        shape = (n, c, CANDIDATES)
        area = self._uniform(shape, self.area, device) * (h * w)  # S_e
        ratio = self._uniform(shape, self.aspect, device)  # r_e
        heights = torch.sqrt(area * ratio).round().long()  # H_e = sqrt(S_e * r_e)
        widths = torch.sqrt(area / ratio).round().long()  # W_e = sqrt(S_e / r_e)
        fits = (heights >= 1) & (heights <= h) & (widths >= 1) & (widths <= w)
        first = fits.to(torch.uint8).argmax(dim=-1, keepdim=True)  # index 0 where nothing fits
        height = heights.gather(-1, first).squeeze(-1)
        width = widths.gather(-1, first).squeeze(-1)
        # Where no candidate fits (a map too small or too elongated for the area/aspect ranges),
        # the first draw is clamped into the map instead of redrawing without end.
        return height.clamp(1, h), width.clamp(1, w)

    def _top_left(self, extent: torch.Tensor, size: int) -> torch.Tensor:
        """Uniform integer offset in [0, size - extent]: every position where the rectangle fits."""
        room = (size - extent + 1).to(torch.float32)
        offset = (torch.rand(extent.shape, generator=self.generator, device=extent.device) * room).long()
        return torch.minimum(offset, size - extent)  # guards the float edge case rand * room == room

    def masks(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one masking: ``(mask, values)`` with ``mask`` bool (N, C, H, W) and ``values`` (N, C).

        ``mask`` is True on the rectangle of every chosen channel and False elsewhere; ``values``
        holds each channel's fill value (drawn for every channel, used where the mask is set).
        """
        if x.dim() != 4:
            raise ValueError(f"LocalFeatureMasking expects feature maps (N, C, H, W), got shape {tuple(x.shape)}")
        if self.generator is not None and self.generator.device.type != x.device.type:
            raise ValueError(f"the generator is on {self.generator.device} but the input is on {x.device}")
        n, c, h, w = x.shape
        device = x.device
        chosen = self._chosen_channels(n, c, device)
        height, width = self._rectangle_sizes(n, c, h, w, device)
        top, left = self._top_left(height, h), self._top_left(width, w)
        values = self._uniform((n, c), self.value, device)
        rows = torch.arange(h, device=device)
        cols = torch.arange(w, device=device)
        in_rows = (rows >= top[..., None]) & (rows < (top + height)[..., None])  # (N, C, H)
        in_cols = (cols >= left[..., None]) & (cols < (left + width)[..., None])  # (N, C, W)
        mask = in_rows[..., :, None] & in_cols[..., None, :] & chosen[..., None, None]
        return mask, values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask, values = self.masks(x)
        # torch.where is out of place and passes gradient only to the entries it keeps.
        return torch.where(mask, values.to(x.dtype)[..., None, None], x)

