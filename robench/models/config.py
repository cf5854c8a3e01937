"""``ModelConfig``: which model a run evaluates and how it sees pixels, validated once."""

from __future__ import annotations

from typing import Any

from pydantic import field_validator
from torch import nn

from robench.errors import UsageError
from robench.models.loading import LoadedModel, load_model
from robench.models.preprocessing import Normalization, resolve_normalization
from robench.validated import Options


class ModelConfig(Options):
    """``source`` is a checkpoint path or spec (``example:digits``, ``timm:NAME``, ``robustbench:NAME``, ...),
    an ``nn.Module`` or a ``LoadedModel``; ``normalize`` a preset name or a ``Normalization``."""

    source: Any
    arch: str | None = None
    num_classes: int | None = None
    weights: str | None = None  # a local weights file for timm:/torchvision: models
    dataset: str | None = None  # robustbench: models: cifar10 (default), cifar100, imagenet
    threat_model: str | None = None  # robustbench: models: Linf (default), L2, corruptions
    model_dir: str | None = None  # robustbench: checkpoints (default: models)
    trust_checkpoint: bool = False
    normalize: str | Normalization | None = None
    mean: str | None = None
    std: str | None = None

    @field_validator("std")
    @classmethod
    def _normalization(cls, value: str | None, info: Any) -> str | None:
        resolve_normalization(info.data.get("normalize"), info.data.get("mean"), value)
        return value

    def load(self) -> LoadedModel:
        return as_loaded_model(self.source, arch=self.arch, num_classes=self.num_classes,
                               trust_checkpoint=self.trust_checkpoint, **self.source_options())

    def source_options(self) -> dict[str, Any]:
        """The options that pick a named model's weights, passed to ``load_model`` as given."""
        return {"weights": self.weights, "dataset": self.dataset, "threat_model": self.threat_model,
                "model_dir": self.model_dir}

    def explicit_normalization(self) -> bool:
        return bool(self.normalize or self.mean or self.std)

    def normalization(self, suggested: str | None = None) -> Normalization | None:
        """An explicit normalize/mean/std wins over a suggestion (a suite's)."""
        preset = self.normalize if self.explicit_normalization() else suggested
        return resolve_normalization(preset, self.mean, self.std)


def as_loaded_model(model: nn.Module | LoadedModel | str, *, arch: str | None = None,
                    num_classes: int | None = None, trust_checkpoint: bool = False,
                    **source_options: Any) -> LoadedModel:
    """A checkpoint path or spec is loaded; a module is taken as it is (not copied, not changed).

    ``source_options`` (weights, dataset, threat_model, model_dir) pick a named model's weights.
    """
    if isinstance(model, str):
        return load_model(model, arch=arch, num_classes=num_classes, trust_checkpoint=trust_checkpoint,
                          **source_options)
    given = [name for name, value in source_options.items() if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)} need a model given by name (timm:, torchvision:, hf:, "
                         f"robustbench:), not {type(model).__name__}")
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        return LoadedModel(model, type(model).__name__, "<module>")
    raise UsageError(f"model must be a checkpoint path, an nn.Module or a LoadedModel, got {type(model).__name__}")
