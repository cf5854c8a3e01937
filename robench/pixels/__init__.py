"""Random few-pixel changes and the Pixel-index (Zhang & Cai, "Robustness Augmentation
of Deep Learning Model Based on Pixel Change")."""

from robench.pixels.perturb import pixel_trials
from robench.pixels.index import pixel_index, pixel_index_terms
from robench.pixels.perturb import change_pixels

__all__ = ["change_pixels", "pixel_index", "pixel_index_terms", "pixel_trials"]
