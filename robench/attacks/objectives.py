"""What an attack optimises: loss objects given to the attack.

An objective turns the model's outputs and the targets ``y`` into one loss per
sample (gradient attacks ascend their sum) and, where that means something, says
which samples are fooled. Classification uses cross-entropy on the label;
re-identification brings feature-space objectives (:mod:`robench.reid.objectives`).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


class Objective:
    """Base of every objective. Class attributes describe how attacks may use it."""

    scores: bool = True  # has a per-sample "fooled" (any-iterate early stop and scoring use it)
    coupled: bool = False  # a sample's loss depends on the others in its batch: batches are never split
    needs_random_start: bool = False  # the gradient vanishes at the clean input itself

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def fooled(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(outputs), dtype=torch.bool, device=outputs.device)

    def losses_and_output_grad(self, outputs: torch.Tensor,
                               y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The losses and the gradient of their sum with respect to ``outputs`` (detached), worked out
        directly, or None: autograd then differentiates ``__call__``.

        An objective that answers gives autograd's own numbers: the same operations on the same values
        (a test compares them bit for bit). It spares recording and running a dozen small backward nodes
        a step, a visible share of the step where the model is small."""
        return None

    def _loss_is(self, cls: type) -> bool:
        """Whether this objective's loss is ``cls``'s own: a subclass that redefines ``__call__`` is
        differentiated by autograd, not by ``cls``'s direct gradient."""
        return type(self).__call__ is cls.__call__

    def describe(self) -> dict:
        return {}


class CrossEntropy(Objective):
    """Cross-entropy on the true label; a sample is fooled when the top class is another."""

    def __call__(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # In fp32 whatever the model's precision: fp16 logits lose the small per-sample gradients.
        return F.cross_entropy(outputs.float(), y, reduction="none")

    def fooled(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(dim=1) != y


class Unscored(Objective):
    """For outputs without a per-sample "fooled" (features ranked against a gallery): nothing is scored."""

    scores = False
