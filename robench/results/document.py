"""The blocks every results document shares, built in one place for all three kinds of run.

Classification and ReID documents (``robench.results/1``) and Pixel-index documents
(``robench.pixel-index/1``) open with the same header and describe the model, the data
and the environment the same way; only the measurements differ. A field a kind does not
have (a ReID run has no speed measurement, a Pixel-index run no precision choice) is
left out rather than written as null, so each document keeps the fields it always had.

Schema ``robench.results/1`` (documented in README, "Results"):

* ``clean``: ``{"accuracy", "n", "correct"}``
* ``attacks``: one object per (attack, eps): ``attack``, ``label``, ``norm``,
  ``eps`` (pixel units unless ``eps_space`` says normalized), ``accuracy``,
  ``success_rate`` (fooled / attacked, attacked = clean-correct samples),
  ``n``, ``attacked``, ``params``, ``seconds``, ``gradient_evals``,
  ``peak_memory_bytes``
* ``robust_accuracy``: accuracy under the worst case per sample over all entries
* ``mean_attack_accuracy``: mean of the entries' accuracies (the papers' "Mean")
* ``model``, ``suite``, ``data``, ``env``, ``sanity``, ``complete``
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robench._version import __version__
from robench.models.checkpoints import LoadedModel
from robench.models.preprocessing import Normalization
from robench.evaluation.precision import device_name


# Marks an optional field the caller did not give; None is a real value (e.g. no normalisation).
ABSENT: Any = object()


def _present(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not ABSENT}


def header(schema: str, task: str, complete: bool) -> dict[str, Any]:
    """The first fields of a document: what it is, and whether the run finished."""
    return {"schema": schema, "task": task, "complete": complete}


def model_block(loaded: LoadedModel, *, num_classes: Any = ABSENT, normalization: Any = ABSENT,
                **details: Any) -> dict[str, Any]:
    """Name, source, architecture and checkpoint hash, then what the kind adds (``details`` last)."""
    norm = normalization.as_dict() if isinstance(normalization, Normalization) else normalization
    return _present({"name": loaded.name, "source": loaded.source, "arch": loaded.arch, "sha256": loaded.sha256,
                     "num_classes": num_classes, "normalization": norm, **details})


def suite_block(name: str, source: str | None, sha256: str, *, eps_space: Any = ABSENT,
                overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """``sha256`` is that of the suite as run; ``overrides`` (``--eps``/``--norm``) appear only when given."""
    return _present({"name": name, "source": source, "sha256": sha256, "eps_space": eps_space,
                     "overrides": ABSENT if overrides is None else overrides})


def data_block(described: dict[str, Any], fingerprint: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    """How the kind names and counts its data, the fingerprint runs are matched by, then extra details."""
    return {**described, "fingerprint": fingerprint, **(details or {})}


def software_versions() -> dict[str, str]:
    return {"robench": __version__, "torch": torch.__version__, "torchvision": torchvision_version(),
            "python": platform.python_version(), "numpy": np.__version__}


def torchvision_version() -> str:
    """torchvision's ``__version__``, local tag included (``0.29.1+cpu``: the package metadata drops it).
    Read from its version.py rather than imported: importing torchvision loads torch._dynamo, about two
    seconds of every run that needs nothing else from it."""
    loaded = sys.modules.get("torchvision")
    if loaded is not None:
        return str(loaded.__version__)
    try:
        source = importlib.metadata.distribution("torchvision").locate_file("torchvision/version.py")
        found = re.search(r"""^__version__ = ['"]([^'"]+)['"]""", Path(str(source)).read_text(), re.MULTILINE)
    except (importlib.metadata.PackageNotFoundError, OSError):
        found = None
    if found is None:  # an unusual install: ask the package itself
        import torchvision

        return str(torchvision.__version__)
    return found.group(1)


def env_block(device: torch.device, *, seed: int, batch_size: int, checkpoint_sha256: str | None,
              dataset_fingerprint: str, seconds: float, precision: Any = ABSENT, processes: Any = ABSENT,
              speed: Any = ABSENT, suite_sha256: Any = ABSENT, forward_images: Any = ABSENT) -> dict[str, Any]:
    """Software, machine and run settings; ``finished_at`` is stamped now, when the document is built."""
    return _present({
        **software_versions(), "device": str(device), "device_name": device_name(device),
        "precision": precision, "seed": seed, "batch_size": batch_size, "checkpoint_sha256": checkpoint_sha256,
        "processes": processes, "speed": speed, "suite_sha256": suite_sha256,
        "dataset_fingerprint": dataset_fingerprint, "seconds": round(seconds, 3), "forward_images": forward_images,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
