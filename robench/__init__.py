"""robench: adversarial-robustness evaluation for PyTorch.

The public names are imported on first use (PEP 562): ``import robench`` and the
command line's ``--help`` stay fast, and torch is loaded only when something runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from robench._version import __version__

# public name -> module that defines it
_EXPORTS = {
    "EvaluationResult": "robench.api",
    "evaluate": "robench.api",
    "register_attack": "robench.attacks.registry",
    "EvalConfig": "robench.config",
    "load_model": "robench.models",
    "pixel_index": "robench.pixels",
    "pixel_index_folder": "robench.pixels.folder",
    "evaluate_reid": "robench.reid.api",
    "run_evaluation": "robench.runner",
    "load_suite": "robench.suites",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # static analysers see the real names
    from robench.api import EvaluationResult, evaluate
    from robench.attacks.registry import register_attack
    from robench.config import EvalConfig
    from robench.models import load_model
    from robench.pixels import pixel_index
    from robench.pixels.folder import pixel_index_folder
    from robench.reid.api import evaluate_reid
    from robench.runner import run_evaluation
    from robench.suites import load_suite


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'robench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
