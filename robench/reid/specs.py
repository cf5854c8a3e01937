"""ReID data specs: ``market1501:ROOT``, ``dukemtmc:ROOT``, ``reid:ROOT`` or a bundled ReID example."""

from __future__ import annotations

from robench.errors import UsageError
from robench.examples import is_reid_example, load_example_reid_data
from robench.reid.datasets import PATTERNS, ReIDData, load_reid

REID_KINDS = tuple(PATTERNS)


def is_reid_spec(spec: str | None) -> bool:
    """``market1501:ROOT``, ``dukemtmc:ROOT``, ``reid:ROOT`` or a bundled ReID example (``example:reid-digits``)."""
    if not spec or ":" not in spec:
        return False
    kind, _, name = spec.partition(":")
    if kind.lower() == "example":
        return is_reid_example(name)
    return kind.lower() in REID_KINDS


def load_reid_spec(spec: str, pattern: str | None = None) -> ReIDData:
    kind, _, root = spec.partition(":")
    if kind.lower() == "example" and is_reid_spec(spec):
        if pattern is not None:
            raise UsageError(f"--reid-pattern does not apply to {spec}: its ids and cameras are stored with it")
        return load_example_reid_data(root)
    return load_reid(kind.lower(), root, pattern)
