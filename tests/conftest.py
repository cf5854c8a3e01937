"""Shared fixtures: scikit-learn's digits and a CNN trained on them in this session."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from robench.examples import digits_cnn


@pytest.fixture(scope="session")
def digits_split():
    """uint8 NHWC images (0..16 scaled to 0..255) and labels, 70/30 stratified split."""
    bunch = load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    y = bunch.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=1, stratify=y)
    return x_tr, x_te, y_tr, y_te


def to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="session")
def trained_model(digits_split):
    """The digits CNN trained for a few seconds on the CPU; eval mode, ~97% test accuracy."""
    x_tr, _, y_tr, _ = digits_split
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = digits_cnn()
    gen = torch.Generator().manual_seed(1)
    xt, yt = to_tensor(x_tr), torch.from_numpy(y_tr)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(25):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), 64):
            batch = order[start:start + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def test_tensors(digits_split):
    """Test images as float NCHW in [0,1] and labels as a LongTensor."""
    _, x_te, _, y_te = digits_split
    return to_tensor(x_te), torch.from_numpy(y_te)
