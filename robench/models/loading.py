"""Load any checkpoint: TorchScript, (wrapped) state dicts, safetensors, trusted pickles."""

from __future__ import annotations

import hashlib
import importlib
import os
import pickle
import re
import sys
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from robench.errors import RunError, UsageError
from robench.files import check_regular_file
from robench.models.preprocessing import Normalization, Preprocessing
from robench.registry import did_you_mean

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "model_ema", "net", "network")
_MAX_LISTED_KEYS = 8
# More classes than any classifier has (ImageNet-21k: 21,841); a bound keeps a typo or a forged
# file from allocating a classifier of terabytes before a single shape is compared.
MAX_CLASSES = 1 << 20


@dataclass
class LoadedModel:
    """A model ready to evaluate and where it came from.

    ``source`` is the file or the spec (``timm:resnet50``); ``sha256`` that of the weights
    file, when there is one; ``preprocessing`` what a named source (timm, torchvision,
    Hugging Face, RobustBench) says the model expects, ``weights`` a ``--weights`` file.
    """

    model: nn.Module
    name: str
    source: str
    sha256: str | None = None
    arch: str | None = None
    normalization: Normalization | None = None
    info: dict[str, Any] = field(default_factory=dict)
    preprocessing: Preprocessing | None = None
    weights: str | None = None

    def provenance(self) -> dict[str, Any]:
        """What results.json adds to the model block: only what is known, so file runs keep their keys."""
        record: dict[str, Any] = {}
        if self.weights is not None:
            record["weights"] = self.weights
        if self.preprocessing is not None:
            record["preprocessing"] = self.preprocessing.as_dict()
        return record


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --- architectures a suite may name without importing anything ---------------------------

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


def hub_cache_path(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` keeps the file of ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def read_hub_weights(url: str, trust: bool, *, progress: bool = True) -> dict[str, torch.Tensor]:
    """The state dict at ``url``, from torch.hub's cache (downloaded there first, hash-checked, as torch.hub does)."""
    path = hub_cache_path(url)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(path.name)  # torchvision names files NAME-<sha256 prefix>.pth
        torch.hub.download_url_to_file(url, str(path), match.group(1) if match else None, progress=progress)
    check_regular_file(path, "cached weights file")
    return unwrap_state_dict(read_checkpoint(path, trust, "cpu"), str(path))


# --- loading -----------------------------------------------------------------------------


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
    # Imported here: the named sources build on this module's readers.
    from robench.models import sources

    options = sources.SourceOptions(weights=weights, num_classes=num_classes, dataset=dataset,
                                    threat_model=threat_model, model_dir=model_dir,
                                    trust_checkpoint=trust_checkpoint)
    if sources.is_named_spec(spec):
        return sources.load_named(spec, options, arch=arch, arch_option=arch_option)
    sources.refuse_source_options(spec, options)
    if spec.startswith("example:"):
        from robench.examples import load_example_model

        return load_example_model(spec.split(":", 1)[1])
    path = Path(spec)
    check_model_path(path, spec)
    digest = hash_model_file(path, spec)
    name = path.stem
    program = program_kind(path)
    if program is not None:
        module = _load_program(path, spec, program, trust_checkpoint, map_location, arch_option)
        info = _mode_info(module)
        return LoadedModel(module.eval(), name, str(path), digest, arch="torchscript", info=info)

    trained = _trained_info(path, arch)
    if trained is not None:
        arch = trained.arch
        num_classes = trained.num_classes if num_classes is None else num_classes
    state = read_checkpoint(path, trust_checkpoint, map_location)
    if isinstance(state, Mapping):  # e.g. {"model": <nn.Module>, "epoch": 3} from a trusted pickle
        state = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), nn.Module)), state)
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


def _trained_info(path: Path, arch: str | None):
    """A ``robench train`` checkpoint names its architecture and preprocessing; ``--arch`` still wins."""
    if path.suffix != ".safetensors" or arch is not None:
        return None
    from robench.models.trained import check_fits, importable_without_code, read_trained

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


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def check_model_path(path: Path, spec: str) -> None:
    """A pipe would block and a device such as /dev/zero never ends: refused before anything reads them."""
    if path.is_dir():
        raise UsageError(f"model path is a directory, expected a checkpoint file: {spec}")
    check_regular_file(spec, "model file")


def hash_model_file(path: Path, spec: str) -> str:
    try:
        return sha256_file(path)
    except OSError as exc:
        raise UsageError(f"cannot read model file {spec}: {_os_reason(exc)}") from None


# Programs, not weights: loading either kind runs code stored in the file. TorchScript's
# `code/` is interpreted by torch.jit.load, and a scripted class's __setstate__ runs while
# the file is being loaded, so no check after loading can help. An allow-list of operators
# would have to parse the TorchScript source ourselves before loading; refusing the whole
# kind unless the user vouches for the file is the only airtight rule.
TORCHSCRIPT = "TorchScript program"
EXPORTED = "torch.export program"


def program_kind(path: Path) -> str | None:
    """Classify the archive by its member names alone; nothing in it is deserialised."""
    names = _torch_archive_records(path) + _zip_member_names(path)
    if any(_is_torchscript_record(n) for n in names):
        return TORCHSCRIPT
    if any(_is_exported_record(n) for n in names):
        return EXPORTED
    return None


def _torch_archive_records(path: Path) -> list[str]:
    """Member names as torch's own archive reader (the one torch.jit.load uses) sees them.

    Asking the same reader avoids any disagreement between two zip parsers about what is inside.
    """
    try:
        return list(torch._C.PyTorchFileReader(str(path)).get_all_records())
    except Exception:  # noqa: BLE001 - unreadable by torch: torch.jit.load could not run it either
        return []


def _zip_member_names(path: Path) -> list[str]:
    """Python's view of the same archive, with the top folder stripped like torch does."""
    try:
        with zipfile.ZipFile(path) as zf:
            return [n.split("/", 1)[1] if "/" in n else n for n in zf.namelist()]
    except (zipfile.BadZipFile, OSError, ValueError):
        return []


def _is_torchscript_record(name: str) -> bool:
    # constants.pkl is what torch.load itself uses to hand an archive to torch.jit.load;
    # code/ and bytecode.pkl hold the program (full and mobile formats).
    return name in ("constants.pkl", "bytecode.pkl") or name.startswith("code/") or name.endswith(".debug_pkl")


def _is_exported_record(name: str) -> bool:
    return name in ("archive_format", "serialized_exported_program.json") or (
        name.startswith("models/") and name.endswith(".json"))


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


def read_checkpoint(path: Path, trust: bool, map_location: Any) -> Any:
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
            reason = _refused_global(exc)
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


def _refused_global(exc: Exception) -> str:
    """The object torch's safe unpickler refused ("GLOBAL torch.nn...Sequential"), whole, or nothing."""
    text = str(exc.__context__ or exc)
    match = re.search(r"GLOBAL (\S+)", text)
    return f"it holds {match.group(1)}" if match else ""


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
    return {strip_prefixes(k): v for k, v in obj.items()}


def _is_tensor_map(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def strip_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


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


def load_weights(module: nn.Module, tensors: dict[str, torch.Tensor], spec: str, arch: str) -> None:
    expected = module.state_dict()
    # Some exporters keep an extra `model.` prefix; drop it only if that makes keys match.
    if not set(tensors) & set(expected):
        stripped = {k[len("model."):] if k.startswith("model.") else k: v for k, v in tensors.items()}
        if set(stripped) & set(expected):
            tensors = stripped
    problems = fit_problems(_shapes(expected), _shapes(tensors))
    if problems:
        raise UsageError(f"{spec} does not fit --arch {arch}: {problems}")
    module.load_state_dict(tensors, strict=True)


def _shapes(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def fit_problems(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> str:
    """What keeps tensors of shapes ``found`` from loading where ``expected`` are wanted ("" if nothing)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shape_bad = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if shape_bad:
        detail = [f"{k} {tuple(found[k])} vs {tuple(expected[k])}" for k in shape_bad]
        parts.append(f"shape mismatch ({len(shape_bad)}): {_listing(detail)}")
    return "; ".join(parts)


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED_KEYS])
    return shown + (f", ... (+{len(items) - _MAX_LISTED_KEYS} more)" if len(items) > _MAX_LISTED_KEYS else "")
