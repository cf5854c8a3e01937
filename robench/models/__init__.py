"""Model loading, preprocessing metadata and the normalising wrapper."""

from robench.models.loading import LoadedModel, load_model
from robench.models.preprocessing import PRESETS, Normalization, resolve_normalization
from robench.models.wrapper import RobustModel, evaluation_mode, logits_from

__all__ = [
    "LoadedModel",
    "Normalization",
    "PRESETS",
    "RobustModel",
    "evaluation_mode",
    "load_model",
    "logits_from",
    "resolve_normalization",
]
