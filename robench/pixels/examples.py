"""The changed images of ``robench pixel-index --save-adversarial``: one set per setting and pixel count.

The images are those of the first trial, drawn again from the same per-image streams the
experiment used (keyed by seed, setting, pixel count and image position), so they are
exactly the images trial 0 put through the model. Pixel changes happen on the 8-bit grid:
nothing is rounded. Images the model misclassified before any change are not changed
(``adversarial == clean``), as the experiment leaves them out.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from robench.attacks import randomness
from robench.evaluation.kept_examples import as_float, quantize_clean, samples_to_keep
from robench.models.wrapper import RobustModel, evaluation_mode
from robench.pixels.experiment import PixelSetting
from robench.pixels.perturb import change_pixels
from robench.results.adversarial import SavedExamples, nhwc

TRIAL = 0  # the trial whose changes are saved


def pixel_examples(model: RobustModel, images: torch.Tensor, labels: torch.Tensor | None, *, count: int,
                   pixels: list[int], settings: list[PixelSetting], seed: int = 0, shared_positions: bool = False,
                   channels: str = "all", batch_size: int = 256,
                   device: torch.device = torch.device("cpu")) -> list[SavedExamples]:
    """The first ``count`` images (0: all) changed as trial 0 changed them, per (setting, pixel count).

    ``images``: uint8 NCHW in folder order; ``labels`` None means "the clean prediction", as in
    ``run_pixel_experiments``.
    """
    keep = samples_to_keep(count, 0, len(images))
    clean = images[:keep]
    ids = torch.arange(keep, device=device)  # the experiment keys draws by position in the image list
    with evaluation_mode(model), torch.no_grad():
        x = as_float(clean.to(device))
        clean_pred = _predict(model, x, batch_size)
        reference = clean_pred if labels is None else labels[:keep].to(device)
        evaluated = clean_pred == reference
        out = []
        for setting in settings:
            for n in pixels:
                changed = x.clone()
                if bool(evaluated.any()):
                    key = randomness.stream_key(setting.stream(seed, n), TRIAL)
                    changed[evaluated] = change_pixels(x[evaluated], n, sample_ids=ids[evaluated], key=key,
                                                       delta=setting.delta, area=setting.area,
                                                       shared_positions=shared_positions, channels=channels)
                adv_pred = _predict(model, changed, batch_size)
                out.append(_saved(setting, n, clean, quantize_clean(changed.cpu()), reference, clean_pred,
                                  adv_pred, evaluated))
    return out


def _predict(model: RobustModel, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(part).argmax(dim=1) for part in x.split(batch_size)]) if len(x) else \
        torch.empty(0, dtype=torch.long, device=x.device)


def _saved(setting: PixelSetting, n: int, clean: torch.Tensor, changed: torch.Tensor, reference: torch.Tensor,
           clean_pred: torch.Tensor, adv_pred: torch.Tensor, evaluated: torch.Tensor) -> SavedExamples:
    fooled = (adv_pred != reference) & evaluated
    return SavedExamples(
        entry=f"{setting.experiment}:{setting.label}@{n}px", clean=nhwc(clean.cpu()), adversarial=nhwc(changed),
        index=np.arange(len(clean)), label=reference.cpu().numpy(), clean_pred=clean_pred.cpu().numpy(),
        adv_pred=adv_pred.cpu().numpy(), eps=math.nan, norm="l0", attacked=evaluated.cpu().numpy(),
        run_fooled=fooled.cpu().numpy(),
        extra={"pixels": n, "setting": setting.label, "experiment": setting.experiment, "trial": TRIAL})
