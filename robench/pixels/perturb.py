"""Random few-pixel changes, vectorized over the batch (no per-image Python loop).

Follows the pixel-change paper's three experiments: how many pixels change
(Table 6), by how much (a new value anywhere in [0,255], or an offset within
+/-delta of the old value, clipped: Table 7) and where (uniformly inside a
centred rectangle: Table 8).

Choices the paper leaves open, made here:

* Positions are distinct within an image (drawn without replacement), so
  "64 pixels" always means 64 changed positions.
* All channels of a chosen pixel change, each to its own random value
  (``channels="all"``): a "pixel" of an RGB image is all three values. The
  paper's pseudo-code (Algorithm 1) writes channel 0 only;
  ``channels="first"`` reproduces that.
* Images are 8-bit at the model's input resolution: inputs are rounded to
  the 1/255 grid and so are the outputs.
* The value range r of a +/-delta change is the width of its interval,
  2*delta (at most 255). The paper gives no Pi for its Table 7, so this is
  our reading of Eq. 7: for the default change it writes "the value range
  of modified pixels is 0 to 255" and r = 255/255, i.e. r measures the
  interval's width (hi - lo), not a one-sided amplitude; the interval of a
  +/-delta change, [-delta, +delta], has width 2*delta. Table 7's largest
  setting, +/-127, then spans 254/255 of the scale, as its role as the
  "nearly unrestricted" end of the sweep suggests. Taking r = delta/255
  instead would rate +/-127 as half the default's range although its
  offsets reach just as far. (Clipping at 0 and 255 narrows the realised
  interval near the ends; r describes the drawn interval, as the paper's
  r describes the drawn values.)

Randomness comes from the counter-based streams of
:mod:`robench.attacks.randomness`, keyed by the sample's dataset index: an
image gets the same change whatever batch it is in, and no global RNG is used.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from robench.attacks import randomness
from robench.errors import UsageError

CHANNEL_MODES = ("all", "first")
MAX_TRIALS = 10_000  # random draws per pixel count (suites and `robench pixel-index --trials`)


def area_box(height: int, width: int, area: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """(top, left, rows, cols) of the centred rectangle positions are drawn from."""
    if area is None:
        return 0, 0, height, width
    rows, cols = area
    if not (0 < rows <= height and 0 < cols <= width):
        raise UsageError(f"area {rows}x{cols} does not fit in a {height}x{width} input")
    return (height - rows) // 2, (width - cols) // 2, rows, cols


def value_range(delta: int | None) -> int:
    """Width of the interval new values are drawn from (the Pixel-index's r times 255)."""
    return 255 if delta is None else min(2 * delta, 255)


def change_pixels(
    x: torch.Tensor,
    n_pixels: int,
    *,
    sample_ids: torch.Tensor,
    key: int,
    delta: int | None = None,
    area: tuple[int, int] | None = None,
    shared_positions: bool = False,
    channels: str = "all",
) -> torch.Tensor:
    """Change ``n_pixels`` random pixels of each image of ``x`` (NCHW, [0,1], 8-bit grid)."""
    n, c, h, w = x.shape
    top, left, rows, cols = area_box(h, w, area)
    if not 1 <= n_pixels <= rows * cols:
        raise UsageError(f"cannot change {n_pixels} distinct pixels in a {rows}x{cols} area")
    if delta is not None and not 0 <= delta <= 255:
        raise UsageError(f"delta must be in [0, 255], got {delta}")
    if channels not in CHANNEL_MODES:
        raise UsageError(f"channels must be one of {', '.join(CHANNEL_MODES)}, got {channels!r}")
    device = x.device
    ids = sample_ids.to(device=device, dtype=torch.int64)

    # Distinct positions: the n largest of one uniform score per position of the area.
    position_ids = torch.zeros(1, dtype=torch.int64, device=device) if shared_positions else ids
    scores = randomness.uniform(position_ids, (rows * cols,), randomness.stream_key(key, 1), device)
    slots = scores.topk(n_pixels, dim=1).indices.expand(n, n_pixels)
    flat = (top + slots // cols) * w + (left + slots % cols)  # [N, n_pixels] indices into H*W
    index = flat.unsqueeze(1).expand(n, c, n_pixels)

    levels = torch.round(x.detach().float() * 255.0).clamp_(0, 255).reshape(n, c, h * w)
    old = levels.gather(2, index)
    u = randomness.uniform(ids, (c, n_pixels), randomness.stream_key(key, 2), device)
    if delta is None:
        new = torch.floor(u * 256.0).clamp_(max=255.0)
    else:
        offset = torch.floor(u * (2 * delta + 1)).clamp_(max=2 * delta) - delta
        new = (old + offset).clamp_(0.0, 255.0)
    if channels == "first":
        new[:, 1:] = old[:, 1:]
    levels.scatter_(2, index, new)
    return (levels / 255.0).reshape(n, c, h, w).to(x.dtype)


def pixel_trials(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sample_ids: torch.Tensor,
    *,
    n_pixels: int,
    trials: int,
    key: int,
    **change: Any,
) -> torch.Tensor:
    """Bool [trials, N]: is each image misclassified after each trial's change.

    Trial t uses ``stream_key(key, t)``, so trials are independent draws and a
    result does not depend on how the images were batched.
    """
    out = torch.empty(trials, len(x), dtype=torch.bool, device=x.device)
    with torch.no_grad():
        for t in range(trials):
            changed = change_pixels(x, n_pixels, sample_ids=sample_ids, key=randomness.stream_key(key, t), **change)
            out[t] = model(changed).argmax(dim=1) != y
    return out
