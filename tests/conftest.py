"""Shared fixtures: scikit-learn's digits and a CNN trained on them during the test run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from robench.examples import digits_cnn, train_classifier
from robench.results.schema import CHECK_VARIABLE

# Every document the tests make robench write (results.json, training.json) is validated against its JSON
# Schema before it is written, in this process, in pytest's workers and in every command the tests start:
# a writer that drifts from the published schema fails the test that made it write.
os.environ[CHECK_VARIABLE] = "1"

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # Test processes side by side share the cores: each takes its share of threads (and so do the commands
    # it starts), or OpenMP's waiting threads take the cores from each other.
    THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(THREADS)
    os.environ["OMP_NUM_THREADS"] = str(THREADS)


# Seconds the slowest test files took, summed over their tests, with two test processes on 2 busy cores
# (`pytest --durations=0`). They only order the work: pytest-xdist hands whole files to its processes in the
# order they come (with --no-loadscope-reorder), and starting with the longest keeps one process from running
# a long file alone at the end. A file not listed comes after these, in the usual order.
SLOW_FILES = {
    "test_readme": 179, "test_distributed": 135, "test_autoattack": 102, "test_reid_distributed": 64,
    "test_equivalence": 43, "test_pixel_distributed": 41, "test_reid_interrupt": 37, "test_square": 36,
    "test_pool": 34, "test_training": 30, "test_reliability": 26, "test_save_adversarial": 26, "test_speed": 26,
    "test_interrupt_mid_attack": 24, "test_reid_example": 24, "test_hostile_train": 23, "test_hostile_cli": 19,
    "test_apgd_targeted": 17, "test_new_user": 14, "test_hostile_report": 14, "test_cli": 13,
    "test_docs": 35, "test_tracking": 20, "test_model_sources": 11, "test_reid": 9, "test_plugins": 8, "test_apgd": 8,
    "test_report_html": 7, "test_attack_check": 30, "test_bpda": 22, "test_min_norm": 24, "test_certify": 30,
}


def pytest_collection_modifyitems(items):
    # A stable sort: each file's tests stay together and in their order.
    items.sort(key=lambda item: -SLOW_FILES.get(item.path.stem, 0))


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
