"""Standard data augmentation for small images, on the batch and counter-based like the defences.

Random crops of a zero-padded image (``crop_padding`` pixels on each side) and horizontal flips,
drawn per sample from its dataset index and the epoch's key: a resumed run sees the same crops.
"""

from __future__ import annotations

import torch

from robench.attacks import randomness


class CropFlip:
    def __init__(self, crop_padding: int = 0, flip: bool = False) -> None:
        self.padding, self.flip = crop_padding, flip

    def __call__(self, x: torch.Tensor, sample_ids: torch.Tensor, key: int) -> torch.Tensor:
        u = randomness.uniform(sample_ids, (3,), randomness.stream_key(key, 5), x.device)
        if self.padding:
            x = self._crop(x, u)
        if self.flip:
            flipped = u[:, 2] < 0.5
            x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(3), x)
        return x

    def _crop(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        pad = self.padding
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        top = (u[:, 0] * (2 * pad + 1)).long().clamp(max=2 * pad)
        left = (u[:, 1] * (2 * pad + 1)).long().clamp(max=2 * pad)
        rows = (top.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
        picked = padded.gather(2, rows)
        cols = (left.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
        return picked.gather(3, cols)
