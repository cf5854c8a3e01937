"""Sanity flags: each fires on a model built to trip it, and none fires on a plain trained model."""

from __future__ import annotations

import torch
from torch import nn

import robench
from robench.evaluation.findings import masking_flags

SUITE = {"name": "s", "attacks": [{"attack": "fgsm", "eps": 0.1},
                                  {"attack": "pgd", "eps": 0.1, "steps": 5}]}


def flags(model, data):
    return robench.evaluate(model, data, SUITE, device="cpu").doc["sanity"]


class Wrap(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner


class Noisy(Wrap):
    def forward(self, x):
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        return self.inner(x + 0.3 * torch.randn(x.shape, generator=gen))


class Softmaxed(Wrap):
    def forward(self, x):
        return self.inner(x).softmax(dim=1)


class Quantised(Wrap):
    """Rounds the input to 4 grey levels with a zero gradient: the classic obfuscated-gradient defence."""

    def forward(self, x):
        return self.inner(torch.round(x * 3) / 3)


class BatchStats(Wrap):
    """Centres each image on the mean image of its batch, as BatchNorm in train mode would."""

    def forward(self, x):
        return self.inner((x - x.mean(dim=0, keepdim=True)).clamp(0, 1))


def test_a_plain_trained_model_raises_no_flag(trained_model, test_tensors):
    report = flags(trained_model, test_tensors)
    assert report["flags"] == []
    assert report["zero_gradient_fraction"] < 0.5
    assert not report["nondeterministic_outputs"] and not report["probability_outputs"]


def test_randomness(trained_model, test_tensors):
    with torch.random.fork_rng():
        report = flags(Noisy(trained_model), test_tensors)
    assert report["nondeterministic_outputs"]
    assert any("EoT" in f for f in report["flags"])


def test_probability_outputs(trained_model, test_tensors):
    report = flags(Softmaxed(trained_model), test_tensors)
    assert report["probability_outputs"] and any("probabilities" in f for f in report["flags"])


def test_zero_gradients(trained_model, test_tensors):
    report = flags(Quantised(trained_model), test_tensors)
    assert report["zero_gradient_fraction"] == 1.0
    assert any("gradient masking" in f for f in report["flags"])


def test_batch_dependent_predictions(trained_model, test_tensors):
    report = flags(BatchStats(trained_model), test_tensors)
    assert report["batch_dependent_predictions"]
    assert any("batch size" in f for f in report["flags"])


def test_train_mode_is_reported_and_restored(trained_model, test_tensors):
    trained_model.train()
    try:
        report = flags(trained_model, test_tensors)
        assert trained_model.training
    finally:
        trained_model.eval()
    assert report["model_was_training"] and any("train mode" in f for f in report["flags"])


def test_weaker_attack_beating_iterative_one_is_flagged():
    rows = [
        {"attack": "pgd", "label": "pgd", "norm": "linf", "eps": 0.03, "accuracy": 0.40},
        {"attack": "fgsm", "label": "fgsm", "norm": "linf", "eps": 0.03, "accuracy": 0.30},
        {"attack": "ta.Square", "label": "square", "norm": "linf", "eps": 0.03, "accuracy": 0.20},
        {"attack": "fgsm", "label": "fgsm", "norm": "linf", "eps": 0.06, "accuracy": 0.10},  # no PGD at 0.06
        {"attack": "ta.Square", "label": "square-l2", "norm": "l2", "eps": 0.03, "accuracy": 0.10},  # other norm
    ]
    found = masking_flags(rows)
    assert len(found) == 2
    assert "fgsm (single-step) at eps 0.03" in found[0] and "square (black-box)" in found[1]
    assert masking_flags([rows[0], {**rows[1], "accuracy": 0.45}]) == []


class SometimesNaN(Wrap):
    """NaN logits for images whose top-left pixel is bright."""

    def forward(self, x):
        out = self.inner(x)
        bad = x[:, 0, 0, 0] > 0.5
        return torch.where(bad[:, None], torch.full_like(out, float("nan")), out)


def test_nan_logits_are_counted_as_errors_and_flagged(trained_model, test_tensors):
    x, y = test_tensors
    x = x.clone()
    x[:7, 0, 0, 0] = 1.0
    result = robench.evaluate(SometimesNaN(trained_model), (x, y), SUITE, device="cpu")
    sanity = result.doc["sanity"]
    assert sanity["nonfinite_logits"] == 7 and any("NaN" in f for f in sanity["flags"])
    assert not result.samples["clean_correct"][:7].any(), "a NaN prediction is never correct"
