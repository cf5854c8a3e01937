"""Few-pixel augmentation (pixel-change paper, Section 4 and Algorithm 1) as a training transform.

Each image of a batch is, with probability ``p``, replaced by a copy with ``pixels`` random
pixels set to new random values: the paper's "small-distance samples", which keep the image's
content and teach the model that a few pixels do not change its class. The changes are those
of ``robench pixel-index`` (:func:`robench.pixels.perturb.change_pixels`): distinct positions per
image, a new value in [0, 255] (or within +/-``delta`` of the old one), every channel of a chosen
pixel (``channels="first"`` changes channel 0 only, as the paper's pseudo-code writes).

Where the paper is silent: its Algorithm 1 draws one position list for all images; drawing
positions per image (as here) covers the whole image instead of hardening a few fixed pixels,
and is what its "randomly modify a few pixels in each image" says in words. The paper retrains
on changed copies added to the training set; mixing a share ``p`` of changed images into each
batch does the same without storing copies. The suggested count is 64 pixels for 224x224 images
(0.13%); scale it to the image size.

Randomness is counter-based (keyed by the sample's index and the caller's key, e.g. seed and
epoch): the same image gets the same change in the same epoch whatever its batch.
"""

from __future__ import annotations

import torch

from robench.attacks import randomness
from robench.pixels.perturb import change_pixels


class FewPixelAugment:
    def __init__(self, pixels: int, p: float = 0.5, delta: int | None = None, channels: str = "all") -> None:
        if pixels < 1:
            raise ValueError(f"pixels must be >= 1, got {pixels}")
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.pixels, self.p, self.delta, self.channels = pixels, p, delta, channels

    def check_image_size(self, height: int, width: int) -> None:
        """``ValueError`` when the images have fewer pixels than a change needs: said before training starts
        rather than at the first changed batch."""
        if self.pixels > height * width:
            raise ValueError(f"{self.pixels} distinct pixels do not fit in {height}x{width} images; "
                             f"at most {height * width}")

    def __call__(self, x: torch.Tensor, sample_ids: torch.Tensor, key: int) -> torch.Tensor:
        """``x`` (NCHW in [0,1]) with a share ``p`` of its images changed in exactly ``pixels`` pixels.

        Chosen images are also put on the 8-bit grid (the pixel-change code works in 8-bit levels);
        the others are returned untouched.
        """
        chosen = randomness.uniform(sample_ids, (1,), randomness.stream_key(key, 0), x.device)[:, 0] < self.p
        if not bool(chosen.any()):
            return x
        out = x.clone()
        out[chosen] = change_pixels(x[chosen], self.pixels, sample_ids=sample_ids[chosen],
                                    key=randomness.stream_key(key, 1), delta=self.delta, channels=self.channels)
        return out


class Cutout:
    """Cutout (DeVries & Taylor 2017), the LFM paper's input-level comparison (Tables I-II).

    With probability ``p`` an image gets a ``size`` x ``size`` square set to 0, centred at a uniform
    random pixel and cut off at the border (as the original method does).
    """

    def __init__(self, size: int, p: float = 1.0) -> None:
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.size, self.p = size, p

    def check_image_size(self, height: int, width: int) -> None:
        """``ValueError`` for a square larger than the images: it would blank most of them, silently."""
        if self.size > min(height, width):
            raise ValueError(f"a {self.size}x{self.size} square is larger than the {height}x{width} images; "
                             f"at most {min(height, width)}")

    def __call__(self, x: torch.Tensor, sample_ids: torch.Tensor, key: int) -> torch.Tensor:
        n, _, h, w = x.shape
        u = randomness.uniform(sample_ids, (3,), randomness.stream_key(key, 2), x.device)
        cy = (u[:, 0] * h).floor().clamp(max=h - 1)
        cx = (u[:, 1] * w).floor().clamp(max=w - 1)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        half = self.size // 2
        top, left = (cy - half).view(n, 1, 1), (cx - half).view(n, 1, 1)
        inside = (rows >= top) & (rows < top + self.size) & (cols >= left) & (cols < left + self.size)
        inside &= (u[:, 2] < self.p).view(n, 1, 1)
        return x.masked_fill(inside.unsqueeze(1), 0.0)
