"""The bundled example: a small CNN trained on scikit-learn's digits and its test split.

``example:digits`` names both the model and the data, so
``robench eval example:digits --suite digits`` works offline on any install.
The files are produced by ``tools/make_digits_example.py``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from robench.errors import UsageError

HERE = Path(__file__).resolve().parent
EXAMPLES = {"digits": ("digits_cnn.safetensors", "digits_test.npz")}


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """A small CNN for 8x8 grayscale digits (input in [0,1], no normalisation)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, num_classes),
    )


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, seed: int,
                     lr: float = 2e-3, batch_size: int = 64) -> nn.Module:
    """Plain Adam + cross-entropy training; shuffling from an explicit generator."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            opt.step()
    opt.zero_grad(set_to_none=True)  # hand back a model with no stale weight gradients
    return model.eval()


def _files(name: str) -> tuple[Path, Path]:
    if name not in EXAMPLES:
        raise UsageError(f"unknown example {name!r}; available: {', '.join(EXAMPLES)}")
    weights, data = EXAMPLES[name]
    return HERE / weights, HERE / data


def example_data_path(name: str) -> Path:
    return _files(name)[1]


def load_example_model(name: str):
    from robench.models.loading import LoadedModel, load_model

    weights, _ = _files(name)
    loaded: LoadedModel = load_model(str(weights), arch="robench.examples:digits_cnn", num_classes=10)
    loaded.name = f"example-{name}"
    return loaded
