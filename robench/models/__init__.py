"""Model loading, preprocessing metadata and the normalising wrapper."""

from robench.models.loading import ARCHITECTURES, LoadedModel, load_model, register_architecture
from robench.models.preprocessing import PRESETS, Normalization, resolve_normalization
from robench.models.wrapper import RobustModel, evaluation_mode, logits_from

__all__ = [
    "ARCHITECTURES",
    "LoadedModel",
    "Normalization",
    "PRESETS",
    "RobustModel",
    "evaluation_mode",
    "load_model",
    "logits_from",
    "register_architecture",
    "resolve_normalization",
]
