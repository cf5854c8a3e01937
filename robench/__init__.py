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
    "evaluate": "robench.api",
    "register_attack": "robench.attacks.registry",
    "EvalConfig": "robench.config",
    "UsageError": "robench.errors",
    "load_model": "robench.models",
    "pixel_index": "robench.pixels",
    "Result": "robench.results.result",
    "load_suite": "robench.suites",
    "run_evaluation": "robench.tasks.run",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # static analysers see the real names
    from robench.api import evaluate
    from robench.attacks.registry import register_attack
    from robench.config import EvalConfig
    from robench.errors import UsageError
    from robench.models import load_model
    from robench.pixels import pixel_index
    from robench.results.result import Result
    from robench.suites import load_suite
    from robench.tasks.run import run_evaluation


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'robench' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
