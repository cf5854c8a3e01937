"""The Pixel-index (Zhang & Cai, Eq. 7): Pi = w / (p * r * a).

w: fraction of images misclassified after the change; p: changed pixels /
input pixels; r: value range / 255; a: area the positions are drawn from /
input area. Smaller is more robust: the model needs more, larger or more
widely spread changes to make the same number of mistakes.

The function computes exactly. The paper computes from rounded intermediates
(p = 64/224^2 printed as 0.1276%, a = 200^2/224^2 as 79.72%) and cuts the
result to two decimals, so its figures differ from exact ones in the second
decimal (Table 5, ResNet: 32.60 printed, 32.61 exact).

Cut, not rounded: with p = 0.1276% the five Table 5 quotients are 27.586,
32.601, 46.003, 62.539, 109.326 and the worked example's is 98.306; the paper
prints 27.58, 62.53, 109.32 and 98.30, which only truncation gives (rounding
would print 27.59, 62.54, 109.33, 98.31). We do neither: results keep full
precision and a report may format them as it likes.
"""

from __future__ import annotations

from robench.errors import UsageError


def pixel_index_terms(
    misclassified: int,
    total: int,
    changed_pixels: int,
    image_pixels: int,
    value_range: float = 255,
    area_pixels: int | None = None,
) -> dict[str, float]:
    """The four factors and Pi, as stored in results: ``{"w", "p", "r", "a", "pi"}``."""
    if total <= 0:
        raise UsageError(f"pixel index: total must be > 0, got {total}")
    if not 0 <= misclassified <= total:
        raise UsageError(f"pixel index: misclassified must be in [0, {total}], got {misclassified}")
    if image_pixels <= 0:
        raise UsageError(f"pixel index: image_pixels must be > 0, got {image_pixels}")
    area = image_pixels if area_pixels is None else area_pixels
    if not 0 < area <= image_pixels:
        raise UsageError(f"pixel index: area_pixels must be in (0, {image_pixels}], got {area_pixels}")
    if not 0 < changed_pixels <= area:
        raise UsageError(f"pixel index: changed_pixels must be in (0, {area}], got {changed_pixels}")
    if not 0 < value_range <= 255:
        raise UsageError(f"pixel index: value_range must be in (0, 255], got {value_range}")
    w = misclassified / total
    p = changed_pixels / image_pixels
    r = value_range / 255
    a = area / image_pixels
    return {"w": w, "p": p, "r": r, "a": a, "pi": w / (p * r * a)}


def pixel_index(
    misclassified: int,
    total: int,
    changed_pixels: int,
    image_pixels: int,
    value_range: float = 255,
    area_pixels: int | None = None,
) -> float:
    """Pi = w / (p * r * a); ``area_pixels=None`` means the whole image.

    >>> round(pixel_index(416, 10_000, 64, 224 * 224), 2)  # paper's Table 5 prints 32.60
    32.61
    """
    return pixel_index_terms(misclassified, total, changed_pixels, image_pixels, value_range, area_pixels)["pi"]
