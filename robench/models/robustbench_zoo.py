"""``robustbench:NAME``: a model of RobustBench's zoo, through ``robustbench.utils.load_model``.

RobustBench models take pixels in [0,1] (the normalisation is a layer of the model),
so no normalisation is added; ImageNet entries name an evaluation transform in the zoo
(``Res256Crop224`` ...), which becomes the resize and crop of image folders.

torchattacks' wheel installs a top-level ``robustbench`` package of its own: an old,
partial copy that is not the RobustBench distribution (and does not import on current
Python set-ups). It is recognised by the distribution that owns the files, before
anything of it runs.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from robench.errors import RunError, UsageError
from robench.models.checkpoints import LoadedModel, sha256_file
from robench.models.preprocessing import Preprocessing
from robench.models.source_options import SourceOptions, first_line
from robench.registry import did_you_mean

DATASETS = ("cifar10", "cifar100", "imagenet")
THREAT_MODELS = ("Linf", "L2", "corruptions")
DEFAULT_MODEL_DIR = "models"
INSTALL = "pip install 'robench[robustbench]'"

# Modules RobustBench 1.1.1 imports but does not install (its wheel names `pyautoattack`, which installs
# `pyautoattack`; setuptools 81 and later have no `pkg_resources`).
MISSING_DEPENDENCIES = {
    "pkg_resources": "install it with pip install 'setuptools<81'",
    "autoattack": "install AutoAttack with pip install git+https://github.com/fra31/auto-attack",
}

# The zoo's evaluation transforms by name (robustbench.data.PREPROCESSINGS): (resize, crop, interpolation).
# "Res224" squashes to 224x224; for square images that equals a shorter-side resize to 224.
ZOO_TRANSFORMS: dict[str | None, tuple[int | None, int | None, str]] = {
    None: (None, None, "bilinear"),
    "Res256Crop224": (256, 224, "bilinear"),
    "BicubicRes256Crop224": (256, 224, "bicubic"),
    "Crop288": (None, 288, "bilinear"),
    "Res224": (224, 224, "bilinear"),
}


def load_robustbench(spec: str, name: str, options: SourceOptions) -> LoadedModel:
    dataset = _choice(options.dataset or "cifar10", DATASETS, "--dataset")
    threat_model = _choice(options.threat_model or "Linf", THREAT_MODELS, "--threat-model")
    if options.weights is not None:
        raise UsageError(f"--weights does not apply to {spec}: RobustBench keeps its checkpoints under "
                         "--model-dir (MODEL_DIR/DATASET/THREAT_MODEL/NAME.pt)")
    if options.num_classes is not None:
        raise UsageError(f"--num-classes does not apply to {spec}: the model zoo knows its classes")
    model_dir = options.model_dir or DEFAULT_MODEL_DIR
    utils = import_robustbench()
    entry = _zoo_entry(name, dataset, threat_model)
    try:
        model = utils.load_model(model_name=name, model_dir=model_dir, dataset=dataset, threat_model=threat_model)
    except KeyError as exc:
        raise UsageError(f"RobustBench has no {dataset} {threat_model} model {name!r}"
                         + did_you_mean(name, _zoo_names(dataset, threat_model))) from exc
    except Exception as exc:  # noqa: BLE001 - downloads, unreadable checkpoints
        raise RunError(f"cannot load {spec} ({dataset}, {threat_model}) from {model_dir}: {first_line(exc)}") from exc
    prep = _preprocessing(dataset, threat_model, name, entry)
    checkpoint = Path(model_dir) / dataset / threat_model / f"{name}.pt"
    sha = sha256_file(checkpoint) if checkpoint.is_file() else None
    return LoadedModel(model.eval(), name, spec, sha, arch=f"robustbench:{dataset}/{threat_model}/{name}",
                       preprocessing=prep, weights=str(checkpoint) if sha else None)


def _choice(value: str, choices: tuple[str, ...], option: str) -> str:
    by_lower = {c.lower(): c for c in choices}
    if value.lower() not in by_lower:
        raise UsageError(f"{option} must be one of {', '.join(choices)}, got {value!r}")
    return by_lower[value.lower()]


def import_robustbench() -> Any:
    """``robustbench.utils``, refusing torchattacks' copy with a one-line way out."""
    origin = _origin()
    if origin is None:
        raise UsageError(f"robustbench: models need RobustBench: {INSTALL}")
    owner = _owning_distribution(origin)
    if owner is not None and owner.lower() != "robustbench":
        raise UsageError(
            f"the 'robustbench' package at {Path(origin).parent} was installed by {owner}, which ships a partial "
            f"copy, not RobustBench; install RobustBench in an environment without {owner} ({INSTALL}), or "
            f"`pip uninstall {owner}` and then reinstall robustbench")
    try:
        utils = importlib.import_module("robustbench.utils")
    except ModuleNotFoundError as exc:
        fix = MISSING_DEPENDENCIES.get(exc.name or "", f"reinstall it: {INSTALL}")
        raise UsageError(f"cannot import robustbench ({origin}): {first_line(exc)}; {fix}") from exc
    except Exception as exc:  # noqa: BLE001 - any failure of the package's own imports
        raise UsageError(f"cannot import robustbench ({origin}): {first_line(exc)}; reinstall it: {INSTALL}") from exc
    if not callable(getattr(utils, "load_model", None)):
        raise UsageError(f"the robustbench package at {origin} has no utils.load_model; reinstall it: {INSTALL}")
    return utils


def _origin() -> str | None:
    """Where ``import robustbench`` would come from, found without running it."""
    loaded = sys.modules.get("robustbench")
    if loaded is not None:
        return getattr(loaded, "__file__", None) or "<robustbench in memory>"
    spec = importlib.util.find_spec("robustbench")
    return None if spec is None else (spec.origin or "<robustbench namespace>")


def _owning_distribution(origin: str) -> str | None:
    """The installed distribution whose file list holds ``origin`` (None: not installed by pip)."""
    target = Path(origin).resolve() if Path(origin).exists() else None
    if target is None:
        return None
    for name in metadata.packages_distributions().get("robustbench", []):
        dist = metadata.distribution(name)
        for file in dist.files or ():
            if Path(str(dist.locate_file(file))).resolve() == target:  # typed as a protocol, not PathLike
                return dist.metadata["Name"] or name
    return None


def _zoo() -> Any:
    try:
        return importlib.import_module("robustbench.model_zoo").model_dicts, \
            importlib.import_module("robustbench.model_zoo.enums")
    except (ImportError, AttributeError):
        return None, None


def _zoo_models(dataset: str, threat_model: str) -> dict[str, Any]:
    zoo, enums = _zoo()
    if zoo is None:
        return {}
    try:
        return zoo[enums.BenchmarkDataset(dataset)][enums.ThreatModel(threat_model)]
    except (KeyError, ValueError):
        return {}


def _zoo_names(dataset: str, threat_model: str) -> list[str]:
    return list(_zoo_models(dataset, threat_model))


def _zoo_entry(name: str, dataset: str, threat_model: str) -> dict[str, Any] | None:
    return _zoo_models(dataset, threat_model).get(name)


def _preprocessing(dataset: str, threat_model: str, name: str, entry: dict[str, Any] | None) -> Preprocessing:
    """No normalisation (inside the model); ImageNet's named transform gives the geometry."""
    source = f"robustbench {dataset} {threat_model} model zoo (normalisation inside the model)"
    if dataset != "imagenet":
        return Preprocessing(source=source)
    if entry is None or "preprocessing" not in entry:
        # Entries served through timm are not in the zoo's table: ask RobustBench for the transform.
        return _asked_preprocessing(dataset, threat_model, name, source)
    named = entry["preprocessing"]
    if named not in ZOO_TRANSFORMS:
        # A transform this version does not know: the images are used as they come, and the record says so.
        return Preprocessing(source=source, details=(("zoo_preprocessing", named), ("applied", False)))
    resize, crop, interpolation = ZOO_TRANSFORMS[named]
    return Preprocessing(source=source, input_size=(3, crop, crop) if crop else None, resize=resize, crop=crop,
                         interpolation=interpolation, details=(("zoo_preprocessing", named),))


def _asked_preprocessing(dataset: str, threat_model: str, name: str, source: str) -> Preprocessing:
    """``robustbench.data.get_preprocessing``'s transform, read back into resize, crop and interpolation."""
    try:
        data = importlib.import_module("robustbench.data")
        enums = importlib.import_module("robustbench.model_zoo.enums")
        transform = data.get_preprocessing(enums.BenchmarkDataset(dataset), enums.ThreatModel(threat_model),
                                           name, None)
    except Exception as exc:  # noqa: BLE001 - an older RobustBench, or a model it cannot describe
        return Preprocessing(source=source, details=(("zoo_preprocessing", None), ("applied", False),
                                                     ("reason", first_line(exc))))
    resize = crop = None
    interpolation = "bilinear"
    for step in getattr(transform, "transforms", [transform]):
        kind = type(step).__name__
        if kind == "Resize":
            size = step.size if isinstance(step.size, int) else step.size[0]
            resize, interpolation = int(size), getattr(step.interpolation, "value", "bilinear")
        elif kind == "CenterCrop":
            crop = int(step.size[0]) if not isinstance(step.size, int) else step.size
    return Preprocessing(source=source, input_size=(3, crop, crop) if crop else None, resize=resize, crop=crop,
                         interpolation=interpolation, details=(("zoo_preprocessing", "get_preprocessing"),))
