"""Load any model spec: a checkpoint file (TorchScript, (wrapped) state dicts, safetensors, trusted
pickles), ``example:NAME`` or a model by name.

This module only decides what a spec names; the readers are in ``robench.models.checkpoints``,
the architectures in ``robench.models.architectures`` and the named sources in
``robench.models.sources``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from robench.errors import RunError, UsageError
from robench.examples import example_model_file
from robench.models.architectures import build_arch
from robench.models.checkpoints import (
    EXPORTED,
    WRAPPER_KEYS,
    LoadedModel,
    check_model_path,
    hash_model_file,
    load_weights,
    program_kind,
    read_checkpoint,
    unwrap_state_dict,
)
from robench.models.source_options import SourceOptions
from robench.models.sources import is_named_spec, load_named, refuse_source_options
from robench.models.trained import TrainedInfo, check_fits, importable_without_code, read_trained


def load_model(
    spec: str,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    trust_checkpoint: bool = False,
    map_location: str | torch.device = "cpu",
    arch_option: str = "--arch",
    weights: str | None = None,
    dataset: str | None = None,
    threat_model: str | None = None,
    model_dir: str | None = None,
) -> LoadedModel:
    """Resolve ``spec`` into an ``nn.Module``: a file, ``example:NAME``, or a model by name.

    Named models (``timm:NAME``, ``torchvision:NAME[:WEIGHTS]``, ``hf:REPO_ID``,
    ``robustbench:NAME``) bring their preprocessing (see ``robench.models.sources``);
    ``weights`` is a local weights file for timm/torchvision names, ``dataset``,
    ``threat_model`` and ``model_dir`` select a RobustBench model.
    ``arch_option`` is how the caller's user names the architecture (``--surrogate-arch``,
    say); it only appears in messages. Modules that arrive whole (TorchScript, trusted
    pickles) are put in eval mode; ``info["was_training"]`` says whether they came in train mode.
    """
    options = SourceOptions(weights=weights, num_classes=num_classes, dataset=dataset, threat_model=threat_model,
                            model_dir=model_dir, trust_checkpoint=trust_checkpoint)
    if is_named_spec(spec):
        return load_named(spec, options, arch=arch, arch_option=arch_option)
    refuse_source_options(spec, options)
    if spec.startswith("example:"):
        return load_example_model(spec.split(":", 1)[1])
    path = Path(spec)
    check_model_path(path, spec)
    digest = hash_model_file(path, spec)
    program = program_kind(path)
    if program is not None:
        module = _load_program(path, spec, program, trust_checkpoint, map_location, arch_option)
        info = _mode_info(module)
        return LoadedModel(module.eval(), path.stem, str(path), digest, arch="torchscript", info=info)
    return _load_checkpoint(path, spec, digest, arch, num_classes, trust_checkpoint, map_location, arch_option)


def _load_checkpoint(path: Path, spec: str, digest: str, arch: str | None, num_classes: int | None,
                     trust_checkpoint: bool, map_location: str | torch.device, arch_option: str) -> LoadedModel:
    """A whole module (trusted pickle) or a state dict, built on ``arch`` or the architecture
    ``robench train`` recorded beside it."""
    name = path.stem
    trained = _trained_info(path, arch)
    if trained is not None:
        arch = trained.arch
        num_classes = trained.num_classes if num_classes is None else num_classes
    state = read_checkpoint(path, trust_checkpoint, map_location)
    if isinstance(state, Mapping):  # e.g. {"model": <nn.Module>, "epoch": 3} from a trusted pickle
        state = next((state[k] for k in WRAPPER_KEYS if isinstance(state.get(k), nn.Module)), state)
    if isinstance(state, nn.Module):
        # A file has no deployment mode: checkpoints saved mid-training are in train mode.
        info = _mode_info(state)
        return LoadedModel(state.eval(), name, str(path), digest, arch=type(state).__name__, info=info)
    tensors = unwrap_state_dict(state, spec)
    if arch is None:
        raise UsageError(
            f"{spec} holds a state dict ({len(tensors)} tensors); pass {arch_option} "
            "(e.g. torchvision:resnet18 or my.module:factory) and --num-classes"
        )
    module = build_arch(arch, num_classes)
    load_weights(module, tensors, spec, arch)
    loaded = LoadedModel(module.eval(), name, str(path), digest, arch=arch)
    if trained is not None:
        loaded.preprocessing = trained.preprocessing()
        if name == "model" and trained.recipe:  # robench train's file name: the recipe says more
            loaded.name = trained.recipe
    return loaded


def _trained_info(path: Path, arch: str | None) -> TrainedInfo | None:
    """A ``robench train`` checkpoint names its architecture and preprocessing; ``--arch`` still wins."""
    if path.suffix != ".safetensors" or arch is not None:
        return None
    info = read_trained(path)
    if info is None:
        return None
    if not importable_without_code(info.arch):
        raise UsageError(f"{path} was trained as {info.arch}, which robench imports only when you name it: "
                         f"pass --arch {info.arch} if you trust that module")
    check_fits(path, info)
    return info


def _mode_info(module: nn.Module) -> dict[str, Any]:
    """Recorded before ``.eval()``, which would erase it: the sanity report flags train mode."""
    return {"was_training": any(m.training for m in module.modules())}


def load_example_model(name: str) -> LoadedModel:
    """``example:NAME``: a bundled model, built from the architecture its example names."""
    weights, arch, num_classes = example_model_file(name)
    loaded = load_model(str(weights), arch=arch, num_classes=num_classes)
    loaded.name = f"example-{name}"
    return loaded


def _load_program(path: Path, spec: str, kind: str, trust: bool, map_location: Any, arch_option: str) -> nn.Module:
    if not trust:
        raise UsageError(
            f"{spec} is a {kind}: loading it runs code stored in the file; re-run with --trust-checkpoint "
            f"only if you trust its source, or save a state dict and pass {arch_option}"
        )
    if kind == EXPORTED:
        raise UsageError(
            f"{spec} is a {kind}, which robench cannot evaluate (exported modules have no eval mode); "
            f"save a state dict and pass {arch_option}, or save a TorchScript file"
        )
    try:
        with warnings.catch_warnings():
            # torch deprecates TorchScript loudly; a user who chose to load one needs no lecture on stderr.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.load.*")
            return torch.jit.load(str(path), map_location=map_location)
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable
        raise RunError(f"cannot read TorchScript file {spec}: {exc}") from exc
