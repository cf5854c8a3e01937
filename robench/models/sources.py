"""Models by name, each with the preprocessing its source documents.

``timm:NAME`` (timm's ``pretrained_cfg``), ``torchvision:NAME[:WEIGHTS]`` (the
weights enum's ``transforms()``), ``hf:REPO_ID`` (a timm model on the Hugging
Face hub, its ``config.json``) and ``robustbench:NAME`` (RobustBench's model zoo,
see ``robench.models.robustbench_zoo``). The libraries are optional and imported
only here, inside the functions that need them.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any, Callable, cast

import torch
from torch import nn

from robench.errors import RobenchError, RunError, UsageError
from robench.models.architectures import check_torchvision_arch, torchvision_model
from robench.models.checkpoints import (
    LoadedModel,
    check_model_path,
    hash_model_file,
    hub_cache_path,
    load_weights,
    program_kind,
    read_checkpoint,
    sha256_file,
    unwrap_state_dict,
)
from robench.models.preprocessing import INTERPOLATIONS, Preprocessing, eval_geometry
from robench.models.robustbench_zoo import load_robustbench
from robench.models.source_options import SourceOptions, first_line
from robench.registry import did_you_mean

NAMED_SOURCES = ("timm", "torchvision", "hf", "robustbench")
SPEC_HELP = "timm:NAME, torchvision:NAME[:WEIGHTS], hf:REPO_ID or robustbench:NAME"


def is_named_spec(spec: str) -> bool:
    return spec.partition(":")[0] in NAMED_SOURCES


def refuse_source_options(spec: str, options: SourceOptions) -> None:
    """A checkpoint file or the example has its weights already: the naming options would be ignored."""
    given = (["--weights"] if options.weights is not None else []) + options.robustbench_given()
    if given:
        raise UsageError(f"{_apply(given)} to models by name ({SPEC_HELP}), not to {spec}")


def _apply(flags: list[str]) -> str:
    return f"{' and '.join(flags)} {'applies' if len(flags) == 1 else 'apply'}"


def load_named(spec: str, options: SourceOptions, *, arch: str | None = None,
               arch_option: str = "--arch") -> LoadedModel:
    kind, _, name = spec.partition(":")
    if not name:
        raise UsageError(f"{spec!r} names no model: expected {SPEC_HELP}")
    if arch is not None:
        raise UsageError(f"{arch_option} is for checkpoint files; {spec} names its architecture itself")
    if kind != "robustbench" and options.robustbench_given():
        raise UsageError(f"{_apply(options.robustbench_given())} to robustbench: models only, not to {spec}")
    if kind == "robustbench":
        return load_robustbench(spec, name, options)
    loaders: dict[str, Callable[[str, str, SourceOptions], LoadedModel]] = {
        "timm": _load_timm, "torchvision": _load_torchvision, "hf": _load_hf}
    return loaders[kind](spec, name, options)


# --- shared pieces ---------------------------------------------------------------------------


def require(module: str, message: str) -> Any:
    """Import an optional dependency, or tell the user which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(message) from None


def weights_file(options: SourceOptions, spec: str) -> tuple[Path, str] | None:
    """The ``--weights`` file, checked like a checkpoint and hashed (the resume key depends on it)."""
    if options.weights is None:
        return None
    path = Path(options.weights)
    check_model_path(path, options.weights)
    if program_kind(path) is not None:
        raise UsageError(f"--weights {options.weights} is a program (TorchScript or torch.export), not weights; "
                         f"{spec} takes a state dict (.pt, .pth, .safetensors)")
    return path, hash_model_file(path, options.weights)


def read_state_dict(path: Path, options: SourceOptions) -> dict[str, torch.Tensor]:
    state = read_checkpoint(path, options.trust_checkpoint, "cpu")
    if isinstance(state, nn.Module):
        raise UsageError(f"--weights {path} holds a whole module; save its state_dict() instead")
    return unwrap_state_dict(state, str(path))


def hub_file_sha256(repo_id: str | None) -> str | None:
    """The hash of a Hugging Face hub file already in the local cache (no network)."""
    if not repo_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo_id, _, revision = repo_id.partition("@")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename, revision=revision or None)
        if isinstance(found, str) and Path(found).is_file():
            return sha256_file(Path(found))
    return None


def _check_pretrained_classes(spec: str, options: SourceOptions, classes: int | None) -> None:
    # Asking a pretrained model for another class count silently re-initialises its classifier.
    if options.num_classes is not None and classes is not None and options.num_classes != classes:
        raise UsageError(f"{spec} has {classes} classes, not --num-classes {options.num_classes}; to evaluate "
                         "your own fine-tuned weights pass them with --weights FILE")


# --- timm and the Hugging Face hub ----------------------------------------------------------


def _timm(spec: str) -> Any:
    return require("timm", f"{spec} needs timm: pip install 'robench[timm]'")


def _load_timm(spec: str, name: str, options: SourceOptions) -> LoadedModel:
    timm = _timm(spec)
    if not timm.is_model(name):
        close = did_you_mean(name, timm.list_models())
        raise UsageError(f"unknown timm model {name!r}" + (close if "did you mean" in close else
                                                           "; timm.list_models() lists them"))
    cfg = timm.models.get_pretrained_cfg(name)
    found = weights_file(options, spec)
    if found is None:
        _check_pretrained_classes(spec, options, getattr(cfg, "num_classes", None))
        model = _create_pretrained(timm, name, spec, {})
        sha = hub_file_sha256(_pretrained_cfg(model).get("hf_hub_id"))
        weights = None
    else:
        path, sha = found
        # robench's reader, not timm's: it alone knows --trust-checkpoint, and timm versions differ
        # in what they unpickle. timm gets the tensors, and still adapts them as for its own files.
        tensors = read_state_dict(path, options)
        classes = options.num_classes or _classes_in(tensors, getattr(cfg, "classifier", None))
        overlay: dict[str, Any] = {"state_dict": tensors}
        kwargs: dict[str, Any] = {}
        if classes is not None:
            # The same count in the cfg and the model: timm then loads the classifier instead of dropping it.
            overlay["num_classes"] = kwargs["num_classes"] = classes
        model = _create_from_file(timm, name, spec, path, overlay, kwargs)
        _pretrained_cfg(model).pop("state_dict", None)  # the cfg stays on the model: it must not keep a copy
        weights = str(path)
    return _timm_loaded(timm, model, spec, name, sha, weights)


def _pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    """The configuration timm sets on every model it creates (an attribute nn.Module's types do not know)."""
    return cast(dict[str, Any], model.pretrained_cfg)


def _classes_in(tensors: dict[str, torch.Tensor], classifier: Any) -> int | None:
    """The class count of a fine-tuned file: its classifier's rows (timm's cfg names the classifier)."""
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    for layer in names:
        weight = tensors.get(f"{layer}.weight")
        if weight is not None and weight.ndim:
            return int(weight.shape[0])
    return None


def _create_pretrained(timm: Any, name: str, spec: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - network, cache and hub errors of every kind
        if _refused_pickle(exc):
            raise UsageError(f"the weights file of {spec} holds pickled Python objects, which timm refuses to load "
                             "(it could run code); download it and pass it as timm:ARCHITECTURE --weights FILE "
                             "--trust-checkpoint only if you trust its source") from exc
        raise RunError(f"cannot load the pretrained weights of {spec}: {first_line(exc)}; without network "
                       "access, put them in the local cache first or pass --weights FILE") from exc


def _create_from_file(timm: Any, name: str, spec: str, path: Path, overlay: dict[str, Any],
                      kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as exc:  # load_state_dict: missing, unexpected or mis-shaped keys
        raise UsageError(f"--weights {path} does not fit {spec}: {first_line(exc)}"
                         + ("" if "num_classes" in kwargs else "; pass --num-classes")) from exc
    except Exception as exc:  # noqa: BLE001
        raise RunError(f"cannot load --weights {path} into {spec}: {first_line(exc)}") from exc


def _refused_pickle(exc: BaseException) -> bool:
    """torch's safe unpickler refused the file (timm re-raises that as a RuntimeError)."""
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, pickle.UnpicklingError):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return False


def _timm_loaded(timm: Any, model: nn.Module, spec: str, name: str, sha: str | None,
                 weights: str | None) -> LoadedModel:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    label = ".".join(p for p in (cfg.get("architecture"), cfg.get("tag")) if p) or name
    prep = timm_preprocessing(timm, model, f"timm pretrained_cfg {label}")
    arch = f"timm:{cfg.get('architecture') or name}"
    display = name.replace("/", "--")
    return LoadedModel(model.eval(), display, spec, sha, arch=arch, normalization=prep.normalization,
                       preprocessing=prep, weights=weights)


def timm_preprocessing(timm: Any, model: nn.Module, source: str) -> Preprocessing:
    """timm's own resolution of the model's data config: what ``timm.data.create_transform`` would use."""
    config = timm.data.resolve_data_config(model=model)
    channels, height, width = (int(v) for v in config["input_size"])
    crop_pct = config.get("crop_pct")
    resize, crop = eval_geometry(height, width, crop_pct)
    interpolation = config.get("interpolation") or "bilinear"
    details: tuple[tuple[str, object], ...] = (("crop_pct", crop_pct), ("crop_mode", config.get("crop_mode", "center")))
    if interpolation not in INTERPOLATIONS:  # timm's "random" is a training-time choice
        details += (("source_interpolation", interpolation),)
        interpolation = "bilinear"
    return Preprocessing(source=source, mean=tuple(float(v) for v in config["mean"]),
                         std=tuple(float(v) for v in config["std"]), input_size=(channels, height, width),
                         resize=resize, crop=crop, interpolation=interpolation, details=details)


def _load_hf(spec: str, repo_id: str, options: SourceOptions) -> LoadedModel:
    message = f"{spec} needs timm and huggingface_hub: pip install 'robench[hf]'"
    timm = require("timm", message)
    require("huggingface_hub", message)
    if options.weights is not None:
        raise UsageError(f"--weights does not apply to {spec}: the hub holds its weights; for a local file "
                         "use timm:ARCHITECTURE --weights FILE")
    model = _create_pretrained(timm, "hf-hub:" + repo_id, spec, {})
    classes = getattr(model, "num_classes", None)
    _check_pretrained_classes(spec, options, classes)
    return _timm_loaded(timm, model, spec, repo_id, hub_file_sha256(repo_id), None)


# --- torchvision ------------------------------------------------------------------------------


def _load_torchvision(spec: str, rest: str, options: SourceOptions) -> LoadedModel:
    import torchvision.models as tvm

    name, _, weights_name = rest.partition(":")
    if ":" in weights_name:
        raise UsageError(f"{spec}: expected torchvision:NAME[:WEIGHTS], e.g. torchvision:resnet50:IMAGENET1K_V2")
    check_torchvision_arch(name)
    enum = _torchvision_weights(tvm, name, weights_name, spec) if weights_name else None
    found = weights_file(options, spec)
    if found is None:
        if enum is None:
            raise UsageError(f"{spec} names no weights: name them ({_weight_names(tvm, name)}, or DEFAULT), "
                             f"e.g. torchvision:{name}:DEFAULT, or pass --weights FILE")
        classes = len(enum.meta.get("categories") or []) or None
        _check_pretrained_classes(spec, options, classes)
        try:
            module = torchvision_model(name, enum, trust=options.trust_checkpoint)
        except RobenchError:  # a refused or unreadable file in the cache: its own message
            raise
        except Exception as exc:  # noqa: BLE001 - download and cache errors
            raise RunError(f"cannot load the weights of {spec}: {first_line(exc)}; without network access, "
                           "put them in torch's hub cache first or pass --weights FILE") from exc
        sha, weights = _torch_hub_sha256(enum.url), None
    else:
        path, sha = found
        tensors = read_state_dict(path, options)
        classes = options.num_classes or _torchvision_classes(name, tensors)
        architecture: dict[str, Any] = {"num_classes": classes} if classes else {}  # get_model's own options
        module = torchvision_model(name, **architecture)
        load_weights(module, tensors, str(path), spec)
        weights = str(path)
    prep = torchvision_preprocessing(enum) if enum is not None else None
    return LoadedModel(module.eval(), name, spec, sha, arch=f"torchvision:{name}",
                       normalization=prep.normalization if prep else None, preprocessing=prep, weights=weights)


def _weight_names(tvm: Any, name: str) -> str:
    try:
        return ", ".join(w.name for w in tvm.get_model_weights(name))
    except (ValueError, KeyError):
        return "none known"


def _torchvision_weights(tvm: Any, name: str, weights_name: str, spec: str) -> Any:
    try:
        enum_class = tvm.get_model_weights(name)
    except (ValueError, KeyError):
        raise UsageError(f"torchvision has no weights for {name}; pass --weights FILE") from None
    # Accept torchvision's own spelling too: ResNet50_Weights.IMAGENET1K_V2.
    key = weights_name.rpartition(".")[2].upper()
    if key == "DEFAULT":
        return enum_class.DEFAULT
    try:
        return enum_class[key]
    except KeyError:
        raise UsageError(f"{spec}: {name} has no weights {weights_name!r}; known: "
                         f"{_weight_names(tvm, name)}, DEFAULT") from None


def _torchvision_classes(name: str, tensors: dict[str, torch.Tensor]) -> int | None:
    """The class count of a fine-tuned file: the rows of the architecture's last weight in the file."""
    with torch.device("meta"):  # only the shapes are needed: nothing is allocated
        expected = torchvision_model(name).state_dict()
    for key in reversed(list(expected)):
        if key.endswith(".weight") and expected[key].ndim in (2, 4):
            tensor = tensors.get(key)
            return int(tensor.shape[0]) if tensor is not None and tensor.ndim == expected[key].ndim else None
    return None


def _torch_hub_sha256(url: str | None) -> str | None:
    if not url:
        return None
    cached = hub_cache_path(url)
    return sha256_file(cached) if cached.is_file() else None


def torchvision_preprocessing(enum: Any) -> Preprocessing:
    """Read from the weights' ``transforms()`` (torchvision's ImageClassification preset)."""
    transform = enum.transforms()
    crop = _first(getattr(transform, "crop_size", None))
    resize = _first(getattr(transform, "resize_size", None))
    mean, std = getattr(transform, "mean", None), getattr(transform, "std", None)
    mode = getattr(transform, "interpolation", None)
    interpolation = getattr(mode, "value", mode) or "bilinear"
    return Preprocessing(
        source=f"torchvision {type(enum).__name__}.{enum.name} transforms",
        mean=tuple(float(v) for v in mean) if mean is not None and std is not None else None,
        std=tuple(float(v) for v in std) if mean is not None and std is not None else None,
        input_size=(3, crop, crop) if crop else None, resize=resize, crop=crop, interpolation=interpolation)


def _first(values: Any) -> int | None:
    if values is None:
        return None
    if isinstance(values, int):
        return values
    return int(values[0]) if len(values) else None
