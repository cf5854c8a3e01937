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

from robench.attacks.objectives import Objective
from robench.errors import UsageError

OBJECTIVES = ("away", "odfa", "misrank")


def pairwise_euclidean(f: torch.Tensor) -> torch.Tensor:
    sq = (f * f).sum(dim=1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * f @ f.t()
    return d2.clamp_min(1e-12).sqrt()


def misranking_loss(features: torch.Tensor, pids: torch.Tensor, margin: float = 0.3,
                    exclude_self: bool = True) -> torch.Tensor:
    """Sum over the batch of [farthest other-id distance - closest same-id distance + margin]_+."""
    return misranking_terms(features, pids, margin, exclude_self).sum()


def misranking_terms(features: torch.Tensor, pids: torch.Tensor, margin: float = 0.3,
                     exclude_self: bool = True) -> torch.Tensor:
    """Per image: [farthest other-id distance - closest same-id distance + margin]_+.

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
    return torch.where(has_negative, per_image, torch.zeros_like(per_image))


class FeatureAway(Objective):
    """||f(x') - f(x)||^2 per image; ``y`` holds the clean features."""

    scores = False
    needs_random_start = True  # the gradient is zero at x' = x

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((outputs.float() - y) ** 2).flatten(1).sum(dim=1)


class OppositeDirection(Objective):
    """-||f(x') + f(x)||^2 per image: pull the feature towards the opposite of the clean one."""

    scores = False

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -((outputs.float() + y) ** 2).flatten(1).sum(dim=1)


class MisRanking(Objective):
    """The negated mis-ranking loss per image; ``y`` holds person ids, batches hold whole identities."""

    scores = False
    coupled = True  # each image's loss compares it with the others of its batch

    def __init__(self, margin: float = 0.3, exclude_self: bool = True) -> None:
        self.margin = margin
        self.exclude_self = exclude_self

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -misranking_terms(outputs.float(), y, self.margin, self.exclude_self)


def objective(name: str, *, margin: float = 0.3, exclude_self: bool = True) -> Objective:
    """The loss object for a suite entry's ``objective``."""
    if name == "away":
        return FeatureAway()
    if name == "odfa":
        return OppositeDirection()
    if name == "misrank":
        return MisRanking(margin, exclude_self)
    raise UsageError(f"objective must be one of {', '.join(OBJECTIVES)}, got {name!r}")
