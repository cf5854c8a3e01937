"""Load any checkpoint: TorchScript, (wrapped) state dicts, safetensors, trusted pickles."""

from __future__ import annotations

import hashlib
import importlib
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from robench.errors import RunError, UsageError
from robench.models.preprocessing import Normalization
from robench.registry import did_you_mean

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "model_ema", "net", "network")
_MAX_LISTED_KEYS = 8


@dataclass
class LoadedModel:
    model: nn.Module
    name: str
    source: str
    sha256: str | None = None
    arch: str | None = None
    normalization: Normalization | None = None
    info: dict[str, Any] = field(default_factory=dict)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_model(
    spec: str,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    trust_checkpoint: bool = False,
    map_location: str | torch.device = "cpu",
) -> LoadedModel:
    """Resolve ``spec`` (a file or ``example:NAME``) into an ``nn.Module``."""
    if spec.startswith("example:"):
        from robench.examples import load_example_model

        return load_example_model(spec.split(":", 1)[1])
    path = Path(spec)
    if not path.exists():
        raise UsageError(f"model file not found: {spec}")
    if path.is_dir():
        raise UsageError(f"model path is a directory, expected a checkpoint file: {spec}")
    digest = sha256_file(path)
    name = path.stem
    if _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location=map_location)
        except Exception as exc:  # noqa: BLE001 - any failure means unreadable
            raise RunError(f"cannot read TorchScript file {spec}: {exc}") from exc
        return LoadedModel(module.eval(), name, str(path), digest, arch="torchscript")

    state = _read_checkpoint(path, trust_checkpoint, map_location)
    if isinstance(state, Mapping):  # e.g. {"model": <nn.Module>, "epoch": 3} from a trusted pickle
        state = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), nn.Module)), state)
    if isinstance(state, nn.Module):
        # A file has no deployment mode: checkpoints saved mid-training are in train mode.
        return LoadedModel(state.eval(), name, str(path), digest, arch=type(state).__name__)
    tensors = unwrap_state_dict(state, spec)
    if arch is None:
        raise UsageError(
            f"{spec} holds a state dict ({len(tensors)} tensors); pass --arch "
            "(e.g. torchvision:resnet18 or my.module:factory) and --num-classes"
        )
    module = build_arch(arch, num_classes)
    load_weights(module, tensors, spec, arch)
    return LoadedModel(module.eval(), name, str(path), digest, arch=arch)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except zipfile.BadZipFile:
        return False
    return any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names)


def _read_checkpoint(path: Path, trust: bool, map_location: Any) -> Any:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as exc:  # noqa: BLE001
            raise RunError(f"cannot read safetensors file {path}: {exc}") from exc
    if path.stat().st_size == 0:
        raise RunError(f"checkpoint {path} is empty (0 bytes)")
    try:
        # weights_only first, always: unpickling arbitrary objects runs code.
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _looks_like_pickle(path):
            raise RunError(f"cannot read checkpoint {path}: not a PyTorch checkpoint (neither zip nor pickle)") from exc
        if not trust:
            reason = str(exc.__context__ or "").split("\n")[0][:120]
            raise UsageError(
                f"{path} contains pickled Python objects (a full nn.Module?) and loading it can "
                "execute code; re-run with --trust-checkpoint only if you trust its source"
                + (f" (refused: {reason})" if reason else "")
            ) from exc
    except Exception as exc:  # noqa: BLE001
        raise RunError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    try:
        return torch.load(str(path), map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise RunError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from exc


def _looks_like_pickle(path: Path) -> bool:
    """torch.save writes a zip archive (or, before 1.6, a pickle starting with PROTO)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def unwrap_state_dict(obj: Any, spec: str) -> dict[str, torch.Tensor]:
    """Find the tensors inside common checkpoint wrappers and strip DDP/compile prefixes."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_tensor_map(obj):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _is_tensor_map(obj):
        kind = type(obj).__name__
        keys = ", ".join(list(map(str, obj))[:10]) if isinstance(obj, Mapping) else ""
        raise RunError(
            f"{spec} is not a state dict (found {kind}{': ' + keys if keys else ''}); "
            f"expected tensors, possibly under one of {', '.join(_WRAPPER_KEYS)}"
        )
    return {_strip_prefixes(k): v for k, v in obj.items()}


def _is_tensor_map(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def _strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def build_arch(arch: str, num_classes: int | None) -> nn.Module:
    """``torchvision:NAME`` or ``package.module:factory``."""
    if ":" not in arch:
        raise UsageError(f"--arch must look like torchvision:resnet18 or my.module:factory, got {arch!r}")
    source, name = arch.split(":", 1)
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if source == "torchvision":
        import torchvision.models as tvm

        available = tvm.list_models()
        if name not in available:
            raise UsageError(f"unknown torchvision architecture {name!r}" + did_you_mean(name, available))
        return tvm.get_model(name, weights=None, **kwargs)
    try:
        module = importlib.import_module(source)
    except ImportError as exc:
        raise UsageError(f"cannot import {source!r} for --arch {arch}: {exc}") from exc
    factory: Callable[..., nn.Module] | None = getattr(module, name, None)
    if factory is None or not callable(factory):
        raise UsageError(f"{source} has no callable {name!r} for --arch {arch}")
    try:
        model = factory(**kwargs)
    except TypeError as exc:
        raise UsageError(f"--arch {arch}: calling {name}({kwargs}) failed: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"--arch {arch} returned {type(model).__name__}, not an nn.Module")
    return model


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], spec: str, arch: str) -> None:
    expected = module.state_dict()
    # Some exporters keep an extra `model.` prefix; drop it only if that makes keys match.
    if not set(tensors) & set(expected):
        stripped = {k[len("model."):] if k.startswith("model.") else k: v for k, v in tensors.items()}
        if set(stripped) & set(expected):
            tensors = stripped
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shape_bad = sorted(
        k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape)
    )
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        if shape_bad:
            detail = [f"{k} {tuple(tensors[k].shape)} vs {tuple(expected[k].shape)}" for k in shape_bad]
            parts.append(f"shape mismatch ({len(shape_bad)}): {_listing(detail)}")
        raise UsageError(f"{spec} does not fit --arch {arch}: " + "; ".join(parts))
    module.load_state_dict(tensors, strict=True)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED_KEYS])
    return shown + (f", ... (+{len(items) - _MAX_LISTED_KEYS} more)" if len(items) > _MAX_LISTED_KEYS else "")
