"""Reading checkpoint files and fitting their tensors: what every model source builds on.

Weights files (state dicts, safetensors, torch.hub's cache) are read here; nothing decides
which source a spec names (``robench.models.loading`` does) and no architecture is built
(``robench.models.architectures`` does).
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlparse

import torch
from torch import nn

from robench.errors import RunError, UsageError
from robench.files import check_regular_file
from robench.models.preprocessing import Normalization, Preprocessing

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "model_ema", "net", "network")
_MAX_LISTED_KEYS = 8


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
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not _is_tensor_map(obj):
        kind = type(obj).__name__
        keys = ", ".join(list(map(str, obj))[:10]) if isinstance(obj, Mapping) else ""
        raise RunError(
            f"{spec} is not a state dict (found {kind}{': ' + keys if keys else ''}); "
            f"expected tensors, possibly under one of {', '.join(WRAPPER_KEYS)}"
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
