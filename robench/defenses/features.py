"""Reading a model's intermediate features with forward hooks.

Feature-level defences (the hierarchical alignment of :mod:`robench.defenses.hfa`, for one)
need the outputs of a few named layers next to the logits, without rewriting the model's
``forward``. :class:`FeatureTap` hooks the named submodules and keeps what they produced
in the latest forward pass, still attached to the autograd graph so a loss on the features
trains the backbone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from robench.errors import UsageError
from robench.registry import did_you_mean


def named_submodule(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` in ``model.named_modules()``; a UsageError with a hint if none."""
    modules = dict(model.named_modules())
    if name not in modules:
        candidates = [key for key in modules if key]  # "" is the model itself, not a layer to tap
        raise UsageError(f"model has no submodule {name!r}" + did_you_mean(name, candidates))
    return modules[name]


class FeatureTap:
    """Records the outputs of named submodules during each forward pass.

    ``tap = FeatureTap(model, ["0", "3"]); logits = model(x); feats = tap.features`` gives
    the two layers' outputs of that forward, in the order the names were given. A later
    forward overwrites them (a layer called twice in one forward keeps its last output).
    The tensors are not detached: gradients flow back through them into the model.
    Use as a context manager, or call :meth:`close` to remove the hooks.
    """

    def __init__(self, model: nn.Module, layer_names: Sequence[str]) -> None:
        if isinstance(layer_names, str):
            raise UsageError("layer_names must be a list of submodule names, not one string")
        self.layer_names = list(layer_names)
        # Resolve every name before hooking any, so a typo leaves the model untouched.
        modules = [named_submodule(model, name) for name in self.layer_names]
        self._outputs: dict[str, Any] = {}
        self._handles = [
            module.register_forward_hook(self._recorder(name))
            for name, module in zip(self.layer_names, modules)
        ]

    def _recorder(self, name: str):
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._outputs[name] = output

        return record

    @property
    def features(self) -> list[torch.Tensor]:
        """The recorded outputs, one per name, in the order given to the constructor."""
        missing = [name for name in self.layer_names if name not in self._outputs]
        if missing:
            raise UsageError(
                f"no output recorded for layer(s) {', '.join(map(repr, missing))}: "
                "run a forward pass first (and check that the forward uses these layers)"
            )
        return [self._outputs[name] for name in self.layer_names]

    def clear(self) -> None:
        """Forget the recorded outputs (they hold the graph of the last forward alive)."""
        self._outputs.clear()

    def close(self) -> None:
        """Remove the hooks and forget the outputs; the model runs as if never tapped."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> FeatureTap:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
