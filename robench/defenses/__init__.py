"""Defences from the papers robench mirrors: drop-in modules, transforms and losses for training; and
input-transform defences without useful gradients (quantisation, JPEG), the cases BPDA is for.

Each lives in its own module and is documented with its paper's defaults and equations;
the names below are importable from here (loaded on first use).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "LocalFeatureMasking": "lfm",
    "FeatureDensityDropout": "fdd",
    "insert_after": "insertion",
    "defence_site": "insertion",
    "FewPixelAugment": "few_pixel",
    "Cutout": "few_pixel",
    "GaussianNoiseAugment": "noise",
    "FeatureTap": "features",
    "HierarchicalAlignment": "hfa",
    "AlignmentHead": "hfa",
    "hierarchical_alignment_loss": "hfa",
    "sinkhorn_distance": "hfa",
    "Quantize": "input_transforms",
    "JPEG": "input_transforms",
    "Detach": "input_transforms",
    "InputDefended": "input_transforms",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
