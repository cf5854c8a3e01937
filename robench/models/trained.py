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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from robench.errors import UsageError
from robench.models.architectures import ARCHITECTURES, build_arch, num_classes_problem
from robench.models.checkpoints import fit_problems, strip_prefixes
from robench.models.preprocessing import Preprocessing

PREFIX = "robench."
FORMAT = "robench-trained-1"
MAX_CHANNELS = 64  # mean/std values and input channels
MAX_SIDE = 16384  # input_size height and width, in pixels
MAX_TEXT = 200  # robench.arch and the recipe name


@dataclass(frozen=True)
class TrainedInfo:
    arch: str
    num_classes: int | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    input_size: tuple[int, ...] | None
    recipe: str | None

    def preprocessing(self):
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
    """The metadata ``write_trained`` stored, or None for any other safetensors file.

    A file that claims the format is checked whole before anything is built from it:
    its metadata is text anyone can write, and ``num_classes`` sizes an allocation.
    """
    meta = _metadata(path)
    if meta.get(PREFIX + "format") != FORMAT:
        return None
    arch, info = _arch(path, meta), _info_object(path, meta)
    num_classes = _num_classes(path, info.get("num_classes"))
    mean, std = _floats(path, info, "mean"), _floats(path, info, "std")
    if (mean is None) != (std is None):
        raise damaged(path, "mean and std go together (one is missing)")
    if mean is not None and std is not None and len(mean) != len(std):
        raise damaged(path, f"mean has {len(mean)} values but std has {len(std)}")
    if std is not None and not all(v > 0 for v in std):
        raise damaged(path, f"std values must be > 0, got {list(std)}")
    input_size = _input_size(path, info.get("input_size"))
    if mean is not None and input_size is not None and len(mean) not in (1, input_size[0]):
        raise damaged(path, f"{len(mean)} mean/std values for {input_size[0]} input channels")
    return TrainedInfo(arch=arch, num_classes=num_classes, mean=mean, std=std, input_size=input_size,
                       recipe=_recipe(path, info.get("recipe")))


def damaged(path: Path, problem: str, key: str = "robench.info") -> UsageError:
    return UsageError(f"{path}: {key}: {problem} (the file's metadata is damaged or forged); pass --arch "
                      "and --num-classes to load its tensors as a plain state dict")


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable here: the regular reader reports it
        return {}


def _info_object(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    text = meta.get(PREFIX + "info")
    if text is None:
        raise damaged(path, "is missing")
    try:
        info = json.loads(text)
    except (ValueError, RecursionError):
        raise damaged(path, "is not JSON") from None
    if not isinstance(info, dict):
        raise damaged(path, f"must be a JSON object, got {type(info).__name__}")
    return info


def _arch(path: Path, meta: dict[str, str]) -> str:
    arch = meta.get(PREFIX + "arch")
    if arch is None or not arch.strip() or not arch.isprintable() or len(arch) > MAX_TEXT:
        raise damaged(path, "is missing" if arch is None else f"must name an architecture, got {arch[:80]!r}",
                      key="robench.arch")
    return arch


def _num_classes(path: Path, value: Any) -> int | None:
    problem = num_classes_problem(value)
    if problem:
        raise damaged(path, f"num_classes {problem}")
    return value


def _floats(path: Path, info: dict[str, Any], key: str) -> tuple[float, ...] | None:
    value = info.get(key)
    if value is None:
        return None
    if (not isinstance(value, list) or not 1 <= len(value) <= MAX_CHANNELS
            or not all(_is_number(v) and math.isfinite(v) for v in value)):
        raise damaged(path, f"{key} must be a list of 1 to {MAX_CHANNELS} finite numbers, got {_short(value)}")
    return tuple(float(v) for v in value)


def _input_size(path: Path, value: Any) -> tuple[int, int, int] | None:
    if value is None:
        return None
    sane = (isinstance(value, list) and len(value) == 3 and all(_is_int(v) for v in value)
            and 1 <= value[0] <= MAX_CHANNELS and all(1 <= v <= MAX_SIDE for v in value[1:]))
    if not sane:
        raise damaged(path, f"input_size must be [channels, height, width] with 1 to {MAX_CHANNELS} channels "
                            f"and sides of 1 to {MAX_SIDE} pixels, got {_short(value)}")
    return tuple(value)


def _recipe(path: Path, value: Any) -> str | None:
    if value is None or (isinstance(value, str) and 0 < len(value) <= MAX_TEXT and value.isprintable()):
        return value
    raise damaged(path, f"recipe must be a short one-line name, got {_short(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_fits(path: Path, info: TrainedInfo) -> None:
    """The metadata's network, built on the meta device (no memory), must take the file's tensors.

    Checked before the real network is built: a forged ``num_classes`` within bounds would
    otherwise still allocate its classifier before any shape is compared.
    """
    found = _shapes(path)
    try:
        with torch.device("meta"):
            module = build_arch(info.arch, info.num_classes)
    except UsageError as exc:
        raise UsageError(f"{path}: robench.arch {info.arch}: {exc}") from None
    except Exception:  # noqa: BLE001 - a factory that cannot build on meta: the real build is checked as usual
        return
    problems = fit_problems({k: tuple(v.shape) for k, v in module.state_dict().items()}, found)
    if found and problems:
        raise damaged(path, f"{info.arch} with num_classes {info.num_classes} does not take the file's tensors: "
                            f"{problems}", key="robench.arch/robench.info")


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the header alone; {} when unreadable (the regular reader reports it)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {strip_prefixes(k): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception:  # noqa: BLE001
        return {}


def importable_without_code(arch: str) -> bool:
    """Architectures a file may name: registered ones and torchvision's (no module is imported)."""
    return arch in ARCHITECTURES or arch.startswith("torchvision:")
