"""Model loading (files and models by name), preprocessing metadata and the normalising wrapper."""

from robench.models.architectures import ARCHITECTURES, register_architecture
from robench.models.checkpoints import LoadedModel
from robench.models.loading import load_model
from robench.models.preprocessing import PRESETS, Normalization, Preprocessing, resolve_normalization
from robench.models.wrapper import RobustModel, evaluation_mode, logits_from

__all__ = [
    "ARCHITECTURES",
    "LoadedModel",
    "Normalization",
    "PRESETS",
    "Preprocessing",
    "RobustModel",
    "evaluation_mode",
    "load_model",
    "logits_from",
    "register_architecture",
    "resolve_normalization",
]
