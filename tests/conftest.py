"""Shared fixtures: scikit-learn's digits and a CNN trained on them during the test run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from robench.examples import digits_cnn, train_classifier

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Test processes side by side share the cores: each takes its share of threads (and so do the commands
    # it starts), or OpenMP's waiting threads take the cores from each other.
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(THREADS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)


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
        torch.manual_seed(1)  # layer initialisation only
        model = digits_cnn()
    return train_classifier(model, to_tensor(x_tr), torch.from_numpy(y_tr), epochs=25, seed=1)


@pytest.fixture(scope="session")
def test_tensors(digits_split):
    """Test images as float NCHW in [0,1] and labels as a LongTensor."""
    _, x_te, _, y_te = digits_split
    return to_tensor(x_te), torch.from_numpy(y_te)
