"""The bundled examples: small models trained on scikit-learn's digits, shipped with their data.

``example:digits`` names both the model and the data, so
``robench eval example:digits --suite digits`` works offline on any install;
its files are produced by ``tools/make_digits_example.py``.
``example:reid-digits`` is the re-identification example (``reid_digits.py``,
``tools/make_reid_digits_example.py``): ``robench eval example:reid-digits
--suite reid-pgd``; ``example:reid-digits-surrogate`` is a second embedding
network trained with another seed, a surrogate for transfer attacks.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from robench.errors import UsageError

HERE = Path(__file__).resolve().parent
EXAMPLES = {
    "digits": ("digits_cnn.safetensors", "digits_test.npz"),
    "reid-digits": ("reid_digits_net.safetensors", "reid_digits.npz"),
    "reid-digits-surrogate": ("reid_digits_surrogate.safetensors", "reid_digits.npz"),
}
# name -> (architecture, number of classes); the ReID networks output embeddings
ARCHITECTURES = {
    "digits": ("robench.examples:digits_cnn", 10),
    "reid-digits": ("robench.examples.reid_digits:reid_digits_net", None),
    "reid-digits-surrogate": ("robench.examples.reid_digits:reid_digits_net", None),
}
REID_EXAMPLES = ("reid-digits", "reid-digits-surrogate")
# The training split of the classification example (the 70% the bundled model was trained on):
# what `robench train recipes/digits-*.yaml` trains on.
TRAIN_SPLITS = {"digits": "digits_train.npz"}


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


def example_data_path(name: str, split: str = "test") -> Path:
    """The classification examples' npz (``x``, ``y``) of ``split`` (test, or train where shipped)."""
    if is_reid_example(name):
        raise UsageError(f"example:{name} is re-identification data: use a ReID suite such as reid-pgd")
    test = _files(name)[1]
    if split == "test":
        return test
    if split == "train" and name in TRAIN_SPLITS:
        return HERE / TRAIN_SPLITS[name]
    raise UsageError(f"example:{name} has no {split} split (test" + (", train" if name in TRAIN_SPLITS else "") + ")")


def is_reid_example(name: str) -> bool:
    return name in REID_EXAMPLES


def load_example_reid_data(name: str):
    """The ReID example's query, gallery and train splits (every ReID example shares one data file)."""
    from robench.examples.reid_digits import load_reid_digits

    return load_reid_digits(_files(name)[1], "example:reid-digits")  # results name the data, not the model


def example_model_file(name: str) -> tuple[Path, str, int | None]:
    """The weights file of ``example:NAME``, its architecture and number of classes.

    The model itself is loaded by ``robench.models.loading.load_example_model``: the loader reads
    this catalogue, so the examples never import the loader.
    """
    weights, _ = _files(name)
    arch, num_classes = ARCHITECTURES[name]
    return weights, arch, num_classes
