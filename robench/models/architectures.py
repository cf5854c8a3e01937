"""Architectures by name: registered factories, ``torchvision:NAME`` and ``package.module:factory``.

A suite or a trained checkpoint may name only registered architectures and torchvision's
without an import: the registry is what makes a name usable without running a module.
"""

from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from robench.errors import UsageError
from robench.models.checkpoints import read_hub_weights
from robench.registry import did_you_mean

# More classes than any classifier has (ImageNet-21k: 21,841); a bound keeps a typo or a forged
# file from allocating a classifier of terabytes before a single shape is compared.
MAX_CLASSES = 1 << 20


_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
ARCHITECTURES: Mapping[str, Callable[..., nn.Module]] = MappingProxyType(_ARCHITECTURES)


def register_architecture(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``name`` usable as ``--arch`` and in suites (``surrogate.arch``) without an import.

    Suites are shared files and may not import Python code; registering a factory in-process
    is how an application offers its own architectures to them.
    """
    if not name or name.startswith("torchvision:"):
        raise ValueError(f"architecture name {name!r} is empty or shadows torchvision:NAME")
    if not callable(factory):
        raise TypeError(f"factory for architecture {name!r} is not callable")
    if _ARCHITECTURES.get(name, factory) is not factory:
        raise ValueError(f"architecture {name!r} registered twice")
    _ARCHITECTURES[name] = factory


def _digits_cnn(**kwargs: Any) -> nn.Module:
    # Imported on use: registering the example must not import it (nor anything else).
    from robench.examples import digits_cnn

    return digits_cnn(**kwargs)


register_architecture("robench:digits_cnn", _digits_cnn)


def _from_zoo(name: str) -> Callable[..., nn.Module]:
    def build(**kwargs: Any) -> nn.Module:
        from robench.models.zoo import ZOO

        return ZOO[name](**kwargs)

    return build


# The papers' training networks (robench/models/zoo.py), named without importing the zoo.
for _zoo_name in ("lenet", "resnet18_cifar", "resnet18_gray", "resnet110_cifar"):
    register_architecture(f"robench:{_zoo_name}", _from_zoo(_zoo_name))


def known_architectures() -> list[str]:
    return sorted(_ARCHITECTURES) + ["torchvision:NAME"]


def check_torchvision_arch(name: str) -> None:
    import torchvision.models as tvm

    available = tvm.list_models()
    if name not in available:
        raise UsageError(f"unknown torchvision architecture {name!r}" + did_you_mean(name, available))


def torchvision_model(name: str, weights: Any = None, *, trust: bool = False, **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model``, with every published weights file read by robench's reader.

    torchvision reads weights through ``torch.hub.load_state_dict_from_url``, which unpickles
    with ``weights_only=False``: a file planted in the hub cache would run code. Backbones are
    read the same way (a detection model built with ``weights=None`` still loads its backbone's).
    """
    import torchvision.models as tvm

    check_torchvision_arch(name)
    with _hub_weights_read_by_robench(trust):
        return tvm.get_model(name, weights=weights, **kwargs)


@contextmanager
def _hub_weights_read_by_robench(trust: bool) -> Iterator[None]:
    # WeightsEnum.get_state_dict is the one call every torchvision builder makes for its weights;
    # replacing it for the duration of the build keeps torchvision's own per-model handling
    # (key renames, transform_input, aux heads) without a second copy of it here.
    from torchvision.models import WeightsEnum

    original = WeightsEnum.__dict__["get_state_dict"]

    def get_state_dict(self: Any, *args: Any, progress: bool = True, **kwargs: Any) -> dict[str, torch.Tensor]:
        return read_hub_weights(self.url, trust, progress=progress)

    WeightsEnum.get_state_dict = get_state_dict
    try:
        yield
    finally:
        WeightsEnum.get_state_dict = original


def build_arch(arch: str, num_classes: int | None) -> nn.Module:
    """A registered name, ``torchvision:NAME`` or ``package.module:factory``."""
    problem = num_classes_problem(num_classes)
    if problem:
        raise UsageError(f"num_classes {problem}")
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if arch in _ARCHITECTURES:
        return _call_factory(_ARCHITECTURES[arch], arch, kwargs)
    if ":" not in arch:
        raise UsageError(
            f"--arch must look like torchvision:resnet18 or my.module:factory, got {arch!r}"
            f" (registered: {', '.join(sorted(_ARCHITECTURES))})"
        )
    source, name = arch.split(":", 1)
    if source == "torchvision":
        return torchvision_model(name, **kwargs)
    module = _import_factory_module(source, arch)
    factory: Callable[..., nn.Module] | None = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise UsageError(f"{source} has no callable {name!r} for --arch {arch}")
    return _call_factory(factory, arch, kwargs)


def num_classes_problem(value: Any) -> str:
    """Why ``value`` is no class count ("" if it is one, or None: the factory's default)."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_CLASSES):
        return ""
    return f"must be an integer between 1 and {MAX_CLASSES}, got {value!r}"


def _import_factory_module(source: str, arch: str) -> Any:
    """Import the module of a ``module:factory`` architecture, also from the current folder.

    ``python -m robench`` has the current folder on ``sys.path`` but the ``robench``
    console script does not, so ``--arch mymodels:net`` next to ``mymodels.py`` would
    work one way and not the other; a module that is not found is looked for there too.
    """
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as exc:
        if not _is_the_missing_module(exc, source):
            raise UsageError(f"cannot import {source!r} for --arch {arch}: {exc}") from exc
        first_error = exc
    except ImportError as exc:
        raise UsageError(f"cannot import {source!r} for --arch {arch}: {exc}") from exc
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # last: never shadows an installed module
        importlib.invalidate_caches()
        try:
            return importlib.import_module(source)
        except ModuleNotFoundError as exc:
            if not _is_the_missing_module(exc, source):
                raise UsageError(f"cannot import {source!r} for --arch {arch}: {exc}") from exc
        except ImportError as exc:
            raise UsageError(f"cannot import {source!r} for --arch {arch}: {exc}") from exc
        finally:
            sys.path.remove(cwd)
    raise UsageError(f"cannot import {source!r} for --arch {arch}: {first_error} (not on the Python path nor in "
                     f"the current folder {cwd}); run robench from the folder that holds it or add that "
                     "folder to PYTHONPATH") from first_error


def _is_the_missing_module(exc: ModuleNotFoundError, source: str) -> bool:
    """The module itself (or a package above it) is missing, not something it imports."""
    return exc.name is not None and (source == exc.name or source.startswith(exc.name + "."))


def _call_factory(factory: Callable[..., nn.Module], arch: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise UsageError(f"--arch {arch}: calling it with {kwargs} failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch {arch} returned {type(model).__name__}, not an nn.Module")
    return model
