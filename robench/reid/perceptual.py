"""Multi-scale SSIM (Wang, Simoncelli & Bovik 2003) as a perceptual term for the DMR generator.

Images in [0,1]; an 11-tap Gaussian window (sigma 1.5) and the usual five
scale weights. Small images use as many scales as fit (each scale halves the
size; a scale needs at least the window size), with the weights of the
scales used renormalised to sum 1.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
C1, C2 = 0.01 ** 2, 0.03 ** 2


def _window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = x.shape[1]
    mu_x = F.conv2d(x, window, groups=c)
    mu_y = F.conv2d(y, window, groups=c)
    sxx = F.conv2d(x * x, window, groups=c) - mu_x ** 2
    syy = F.conv2d(y * y, window, groups=c) - mu_y ** 2
    sxy = F.conv2d(x * y, window, groups=c) - mu_x * mu_y
    cs = (2 * sxy + C2) / (sxx + syy + C2)
    luminance = (2 * mu_x * mu_y + C1) / (mu_x ** 2 + mu_y ** 2 + C1)
    return (luminance * cs).flatten(1).mean(1), cs.flatten(1).mean(1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image MS-SSIM of two [N, C, H, W] batches in [0,1]."""
    size = min(window_size, *x.shape[2:])
    window = _window(size, sigma, x.shape[1], x.device, x.dtype)
    scales = 1
    h, w = x.shape[2:]
    while scales < len(SCALE_WEIGHTS) and min(h, w) // 2 ** scales >= size:
        scales += 1
    weights = torch.tensor(SCALE_WEIGHTS[:scales], device=x.device, dtype=x.dtype)
    weights = weights / weights.sum()
    values = []
    for s in range(scales):
        ssim, cs = _ssim_terms(x, y, window)
        values.append(ssim if s == scales - 1 else cs)
        if s < scales - 1:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    stacked = torch.stack(values, dim=1).clamp_min(1e-6)  # negative cs would make the power undefined
    return torch.prod(stacked ** weights, dim=1)
