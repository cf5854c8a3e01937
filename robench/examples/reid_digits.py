"""The bundled re-identification example: digit images as identities seen by four cameras.

Every source image of scikit-learn's digits is one identity. Four cameras see
it through fixed, camera-specific changes (cam 1 as it is, cam 2 shifted and
darker, cam 3 rotated and blurred, cam 4 smaller, low-contrast and noisy) plus
a little seeded jitter per view, at 16x16 pixels. The evaluation identities are
disjoint from those the embedding network was trained on. The data
(``reid_digits.npz``, uint8 gray images with person ids, cameras and the index
of each identity's source image) and the weights are produced by
``tools/make_reid_digits_example.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from robench.reid.datasets import ReIDData, ReIDSplit

IMAGE_SIZE = (16, 16)
EMBEDDING_DIM = 64
SPLITS = ("query", "gallery", "train")


class UnitLength(nn.Module):
    """Scales each feature vector to length 1: the network was trained on the unit sphere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1)


def reid_digits_net() -> nn.Module:
    """3x16x16 images in [0,1] -> a unit-length 64-d embedding."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, EMBEDDING_DIM),
        UnitLength(),
    )


def image_names(pids: np.ndarray, camids: np.ndarray, split: str) -> list[Path]:
    """Market-style names (``0012_c2_q0003.png``): what the dataset fingerprint and listings show."""
    return [Path(f"{pid:04d}_c{cam}_{split[0]}{i:04d}.png") for i, (pid, cam) in enumerate(zip(pids, camids))]


def load_reid_digits(path: Path, spec: str) -> ReIDData:
    """The stored query, gallery and train splits as an in-memory ``ReIDData``."""
    with np.load(path) as arrays:
        splits = {}
        for split in SPLITS:
            pids = arrays[f"{split}_pids"].astype(np.int64)
            camids = arrays[f"{split}_camids"].astype(np.int64)
            images = arrays[f"{split}_images"]
            splits[split] = ReIDSplit(image_names(pids, camids, split), pids, camids, images)
    return ReIDData("example", path, splits["query"], splits["gallery"], splits["train"], source=spec)
