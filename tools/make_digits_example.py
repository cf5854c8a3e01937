"""Rebuild the bundled example: robench/examples/digits_cnn.safetensors, digits_test.npz, digits_train.npz.

Trains the small CNN of ``robench.examples.digits_cnn`` on 70% of scikit-learn's
digits (seeded split) and stores the other 30% as uint8 NHWC images.
Run: python tools/make_digits_example.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from robench.examples import HERE, digits_cnn, train_classifier


def digits_arrays(seed: int = 0):
    """Digits as uint8 NHWC (0..16 scaled to 0..255), split 70/30 stratified."""
    bunch = load_digits()
    x = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    return train_test_split(x, bunch.target.astype(np.int64), test_size=0.3, random_state=seed,
                            stratify=bunch.target)


def train(x: np.ndarray, y: np.ndarray, epochs: int = 40, seed: int = 0) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # layer initialisation
        model = digits_cnn()
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255.0
    return train_classifier(model, xt, torch.from_numpy(y), epochs=epochs, seed=seed)


def main(out: Path = HERE) -> None:
    x_tr, x_te, y_tr, y_te = digits_arrays()
    model = train(x_tr, y_tr)
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_te).permute(0, 3, 1, 2).float() / 255.0).argmax(1).numpy() == y_te).mean()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "digits_cnn.safetensors"))
    np.savez_compressed(out / "digits_test.npz", x=x_te, y=y_te)
    np.savez_compressed(out / "digits_train.npz", x=x_tr, y=y_tr)  # for `robench train recipes/digits-*.yaml`
    print(f"test accuracy {acc:.4f} on {len(y_te)} images; wrote {out}")


if __name__ == "__main__":
    main()
