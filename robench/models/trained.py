"""Checkpoints that say how to build and feed themselves: what ``robench train`` writes.

A trained model is a safetensors file (tensors only: loading it runs no code) whose
metadata names the architecture, the number of classes and the preprocessing, so
``robench eval model.safetensors`` needs no ``--arch``/``--num-classes``/``--normalize``.
Only architectures that need no import (registered names such as ``robench:lenet``, or
``torchvision:NAME``) are taken from a file: a file must not make robench import a module
it names. Both the writer and the reader live here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

PREFIX = "robench."
FORMAT = "robench-trained-1"


@dataclass(frozen=True)
class TrainedInfo:
    arch: str
    num_classes: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    input_size: tuple[int, ...] | None
    recipe: str | None

    def preprocessing(self):
        from robench.models.preprocessing import Preprocessing

        source = f"robench train recipe {self.recipe}" if self.recipe else "robench train"
        return Preprocessing(source, mean=self.mean, std=self.std,
                             input_size=tuple(self.input_size) if self.input_size else None)


def write_trained(path: Path, state: Mapping[str, torch.Tensor], *, arch: str, num_classes: int | None,
                  mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                  input_size: tuple[int, ...] | None, recipe: str | None, extra: dict[str, Any] | None = None) -> None:
    """Write ``state`` and the metadata atomically (a file that exists is complete)."""
    from safetensors.torch import save_file

    metadata = {
        "format": "pt", PREFIX + "format": FORMAT, PREFIX + "arch": arch,
        PREFIX + "info": json.dumps({"num_classes": num_classes, "mean": mean, "std": std,
                                     "input_size": input_size, "recipe": recipe, **(extra or {})}),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)


def read_trained(path: Path) -> TrainedInfo | None:
    """The metadata ``write_trained`` stored, or None for any other safetensors file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable here: the regular reader reports it
        return None
    if meta.get(PREFIX + "format") != FORMAT:
        return None
    try:
        info = json.loads(meta.get(PREFIX + "info", "{}"))
    except json.JSONDecodeError:
        return None

    def floats(key: str) -> tuple[float, ...] | None:
        value = info.get(key)
        return None if value is None else tuple(float(v) for v in value)

    return TrainedInfo(arch=meta[PREFIX + "arch"], num_classes=info.get("num_classes"), mean=floats("mean"),
                       std=floats("std"), input_size=tuple(info["input_size"]) if info.get("input_size") else None,
                       recipe=info.get("recipe"))


def importable_without_code(arch: str) -> bool:
    """Architectures a file may name: registered ones and torchvision's (no module is imported)."""
    from robench.models.loading import ARCHITECTURES

    return arch in ARCHITECTURES or arch.startswith("torchvision:")
