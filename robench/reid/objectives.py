"""What gradient attacks optimise on a re-identification model: feature-space objectives.

The attack machinery (steps, projection to the eps-ball and [0,1]) is the
classification attacks'; only the loss changes, and since a ranking has no
per-sample "fooled" flag, every sample runs all steps (final iterate).

* ``away``: push the adversarial feature away from the image's clean
  feature, ||f(x') - f(x)||^2 (label-free). Its gradient is zero at x' = x,
  so the attack starts from a random point (radius: the step size) when it
  would otherwise start at x.
* ``odfa``: opposite-direction feature attack: pull f(x') towards -f(x).
* ``misrank``: the Deep Mis-Ranking loss (Wang et al., CVPR 2020) over a
  batch of identities: for each image, the farthest other-identity feature
  is pulled closer and the closest same-identity feature pushed away,
  [max_neg d - min_pos d + margin]_+, summed; the attack ascends its negative.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from robench.attacks.base import Attack
from robench.errors import UsageError

OBJECTIVES = ("away", "odfa", "misrank")


def pairwise_euclidean(f: torch.Tensor) -> torch.Tensor:
    sq = (f * f).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * f @ f.t()
    return d2.clamp_min(1e-12).sqrt()


def misranking_loss(features: torch.Tensor, pids: torch.Tensor, margin: float = 0.3,
                    exclude_self: bool = True) -> torch.Tensor:
    """Sum over the batch of [farthest other-id distance - closest same-id distance + margin]_+.

    ``exclude_self=False`` reproduces the released DMR code, whose positive
    mask includes the image itself: the closest "same-id" distance is then
    always 0 and the push-apart term does nothing. With ``exclude_self``, an
    image whose identity has no other image in the batch keeps only the
    pull term (as the released code does for every image).
    """
    f = features.float()
    d = pairwise_euclidean(f)
    same = pids[:, None] == pids[None, :]
    eye = torch.eye(len(f), dtype=torch.bool, device=f.device)
    positive = same & ~eye if exclude_self else same
    negative = ~same
    far_negative = d.masked_fill(~negative, float("-inf")).amax(dim=1)
    close_positive = d.masked_fill(~positive, float("inf")).amin(dim=1)
    close_positive = torch.where(positive.any(dim=1), close_positive, torch.zeros_like(close_positive))
    has_negative = negative.any(dim=1)
    per_image = F.relu(far_negative - close_positive + margin)
    return torch.where(has_negative, per_image, torch.zeros_like(per_image)).sum()


def apply_objective(attack: Attack, objective: str, *, margin: float = 0.3, exclude_self: bool = True) -> Attack:
    """Turn a classification gradient attack into a feature-space one, in place.

    ``y`` given to the attack is then the clean features (away, odfa) or the
    person ids (misrank).
    """
    if objective not in OBJECTIVES:
        raise UsageError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")

    def loss(features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = features.float()
        if objective == "away":
            return ((f - y) ** 2).sum()
        if objective == "odfa":
            return -((f + y) ** 2).sum()
        return -misranking_loss(f, y, margin, exclude_self)

    def never_fooled(features: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(features), dtype=torch.bool, device=features.device)

    # Instance attributes shadow the class's methods: the stepping and projection stay as they are.
    attack.loss = loss  # type: ignore[method-assign]
    attack.is_fooled = never_fooled  # type: ignore[method-assign]
    attack.final_iterate = True
    if objective == "away" and getattr(attack, "random_start", None) in (False, None):
        attack.random_start = attack.step_size  # type: ignore[attr-defined]
    attack.objective = objective  # type: ignore[attr-defined]
    return attack
