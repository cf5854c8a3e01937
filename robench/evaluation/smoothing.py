"""Randomized smoothing (Cohen, Rosenfeld & Kolter, "Certified Adversarial Robustness via Randomized
Smoothing", ICML 2019): the smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c) of a base
classifier f, its CERTIFY and its PREDICT.

CERTIFY, as the paper's Algorithm 1: the classes f gives ``n0`` noisy copies of x select the top class
cA; ``n`` fresh copies estimate pA = P(f(x + noise) = cA) from below, with the one-sided (1 - alpha)
Clopper–Pearson bound pA_lower. Below 1/2 the answer is an abstention; otherwise g is certified to
return cA within the L2 radius sigma * Phi^-1(pA_lower), with probability at least 1 - alpha over the
draws. PREDICT (the paper's prediction procedure) takes the two most frequent classes of ``n`` copies
and answers the first unless the exact two-sided binomial test cannot tell them apart at level alpha.
Here PREDICT counts the same ``n`` estimation copies as CERTIFY (their full class counts): each answer
keeps its own guarantee, which needs only n independent draws, and the smoothed accuracy costs no
forward pass more.

Noise is added to pixels in [0, 1], before the model's normalisation, and is not clamped to [0, 1]: the
guarantee is about Gaussian noise, and clamping would replace it by another distribution, for which
sigma * Phi^-1(pA) is not a radius.

Every copy's noise comes from the project's counter-based streams (``robench.attacks.randomness``),
keyed by the seed, the sample's index in the data and the copy's number (selection copies 0..n0-1,
estimation copies n0..n0+n-1): a sample's answers do not depend on the batch size, on the other
samples or on an interruption. ``batch_size`` copies go through the model per forward pass, copies of
consecutive samples sharing a pass, so small ``n`` still fills the batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from torch import nn

from robench.attacks import randomness
from robench.evaluation.binomial import lower_confidence_bound, normal_quantile, two_sided_half_test

__all__ = ["ABSTAIN", "Answer", "Smoothing", "answer_from_counts", "certify_from_counts", "count_noisy_predictions",
           "noisy_copies", "predict_from_counts"]

ABSTAIN = -1
# A part of every noise key: the draws of certification are a stream of their own, apart from the
# attacks' and the training augmentations' streams that use the same seed.
NOISE_STREAM = 0x5A0


@dataclass(frozen=True)
class Smoothing:
    """The smoothed classifier's noise and CERTIFY's budget: ``n0`` selection and ``n`` estimation copies."""

    sigma: float
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    seed: int = 0

    @property
    def copies(self) -> int:
        """Noisy copies per sample: selection and estimation."""
        return self.n0 + self.n

    def noise_key(self, index: int) -> int:
        return randomness.stream_key(self.seed, NOISE_STREAM, index)


@dataclass(frozen=True)
class Answer:
    """The smoothed classifier's answers for one sample."""

    certified_class: int  # CERTIFY's class, or ABSTAIN
    p_lower: float  # the lower confidence bound on the selected class's probability
    radius: float  # the certified L2 radius; NaN when CERTIFY abstained
    selected_count: int  # estimation copies the model gave the selected class
    predicted: int  # PREDICT's class, or ABSTAIN


def noisy_copies(x: torch.Tensor, index: int, first: int, count: int, smoothing: Smoothing) -> torch.Tensor:
    """Copies ``first`` .. ``first + count - 1`` of the sample ``x`` (C, H, W) whose index in the data is
    ``index``, each plus its own N(0, sigma^2 I) draw; not clamped (see the module's docstring)."""
    copy_ids = torch.arange(first, first + count, device=x.device)
    noise = randomness.normal(copy_ids, tuple(x.shape), smoothing.noise_key(index), x.device)
    return x.unsqueeze(0) + smoothing.sigma * noise.to(x.dtype)


def certify_from_counts(selection: torch.Tensor, estimation: torch.Tensor,
                        smoothing: Smoothing) -> tuple[int, float, float, int]:
    """CERTIFY from the class counts of the selection and estimation copies: (class or ABSTAIN, pA_lower,
    radius or NaN, the estimation count of the selected class)."""
    selected = int(torch.argmax(selection))  # the first of equal counts: the same class every time
    selected_count = int(estimation[selected])
    p_lower = lower_confidence_bound(selected_count, smoothing.n, smoothing.alpha)
    if p_lower < 0.5:
        return ABSTAIN, p_lower, math.nan, selected_count
    return selected, p_lower, smoothing.sigma * normal_quantile(p_lower) if p_lower > 0.5 else 0.0, selected_count


def predict_from_counts(counts: torch.Tensor, alpha: float) -> int:
    """PREDICT from the class counts of ``n`` copies: the top class, unless the two-sided binomial test of
    its count against the runner-up's cannot reject a tie at level alpha."""
    top = torch.topk(counts, k=min(2, len(counts)))
    first = int(top.values[0])
    second = int(top.values[1]) if len(counts) > 1 else 0
    if two_sided_half_test(first, first + second) > alpha:
        return ABSTAIN
    return int(top.indices[0])


def answer_from_counts(selection: torch.Tensor, estimation: torch.Tensor, smoothing: Smoothing) -> Answer:
    certified, p_lower, radius, selected_count = certify_from_counts(selection, estimation, smoothing)
    return Answer(certified, p_lower, radius, selected_count, predict_from_counts(estimation, smoothing.alpha))


class _Counting:
    """One sample's copies as they are counted: the classes of its selection and estimation copies."""

    def __init__(self, x: torch.Tensor, index: int) -> None:
        self.x, self.index = x, index
        self.selection: torch.Tensor | None = None
        self.estimation: torch.Tensor | None = None

    def add(self, predictions: torch.Tensor, first: int, n0: int, classes: int) -> None:
        """The predictions of copies ``first`` .. ``first + len(predictions) - 1``."""
        split = min(max(n0 - first, 0), len(predictions))  # copies below n0 are selection copies
        selection = torch.bincount(predictions[:split], minlength=classes)
        estimation = torch.bincount(predictions[split:], minlength=classes)
        self.selection = selection if self.selection is None else self.selection + selection
        self.estimation = estimation if self.estimation is None else self.estimation + estimation


def count_noisy_predictions(model: nn.Module, samples: Iterable[tuple[torch.Tensor, int]], smoothing: Smoothing,
                            batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each ``(x, index)`` of ``samples`` in turn (x: C, H, W on the model's device), the class counts
    of its selection and of its estimation copies (CPU tensors of the model's class count).

    Copies go through ``model`` ``batch_size`` at a time, in sample order; a sample's counts come out as
    soon as the batch holding its last copy is done. The caller runs it in eval mode without gradients.
    """
    source = iter(samples)
    current: _Counting | None = None
    drawn = 0  # copies of ``current`` already put in a batch
    classes = 0  # the model's output width, known after the first pass
    while True:
        segments: list[tuple[_Counting, int, int]] = []
        room = batch_size
        while room:
            if current is None or drawn == smoothing.copies:
                following = next(source, None)
                if following is None:
                    break
                current, drawn = _Counting(*following), 0
            take = min(room, smoothing.copies - drawn)
            segments.append((current, drawn, take))
            drawn += take
            room -= take
        if not segments:
            return
        batch = torch.cat([noisy_copies(s.x, s.index, first, count, smoothing) for s, first, count in segments])
        logits = model(batch)
        classes = classes or int(logits.shape[1])
        predictions = logits.argmax(dim=1)
        offset = 0
        for sample, first, count in segments:
            sample.add(predictions[offset:offset + count], first, smoothing.n0, classes)
            offset += count
        for sample, first, count in segments:
            if first + count == smoothing.copies:
                assert sample.selection is not None and sample.estimation is not None  # every copy counted
                yield sample.selection.cpu(), sample.estimation.cpu()
