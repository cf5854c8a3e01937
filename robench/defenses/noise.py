"""Gaussian noise augmentation (Cohen, Rosenfeld & Kolter, ICML 2019, Section 5): training the base classifier
on noisy inputs, so that the smoothed classifier ``robench certify`` builds from it is accurate.

Each image of a batch gets, with probability ``p`` (1 in the paper), N(0, sigma^2) noise on every pixel, in
[0, 1] pixel units before the model's normalisation, and is not clamped: the model then sees in training
exactly the distribution certification draws from. Train at the sigma you certify at.

Randomness is counter-based (keyed by the sample's index and the caller's key, e.g. seed and epoch): the
same image gets the same noise in the same epoch whatever its batch, so a resumed run trains on the draws
of an uninterrupted one.
"""

from __future__ import annotations

import torch

from robench.attacks import randomness


class GaussianNoiseAugment:
    def __init__(self, sigma: float, p: float = 1.0) -> None:
        if not sigma > 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        if not 0 <= p <= 1:
            raise ValueError(f"p must be in [0, 1], got {p}")
        self.sigma, self.p = sigma, p

    def check_image_size(self, height: int, width: int) -> None:
        """Any image size takes noise (the trainer asks every input defence before training)."""

    def __call__(self, x: torch.Tensor, sample_ids: torch.Tensor, key: int) -> torch.Tensor:
        """``x`` (NCHW in [0,1]) plus noise on a share ``p`` of its images; the others are returned as they are."""
        noise = randomness.normal(sample_ids, tuple(x.shape[1:]), randomness.stream_key(key, 0), x.device)
        if self.p < 1:
            chosen = randomness.uniform(sample_ids, (1,), randomness.stream_key(key, 1), x.device)[:, 0] < self.p
            noise = noise * chosen.view(-1, *([1] * (x.dim() - 1)))
        return x + self.sigma * noise.to(x.dtype)
