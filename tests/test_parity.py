"""Parity with torchattacks, the reference implementation the papers use."""

from __future__ import annotations

import pytest
import torch

from robench import evaluate
from robench.attacks import BIM, FGSM, PGD

torchattacks = pytest.importorskip("torchattacks")


@pytest.fixture(scope="module")
def batch(test_tensors):
    x, y = test_tensors
    return x[:300], y[:300]


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.2])
def test_fgsm_matches_torchattacks(trained_model, batch, eps):
    x, y = batch
    ours = FGSM(final_iterate=True)(trained_model, x, y, eps).x_adv
    ref = torchattacks.FGSM(trained_model, eps=eps)(x, y)
    assert torch.allclose(ours, ref, atol=1e-6)
    with torch.no_grad():
        assert torch.equal(trained_model(ours).argmax(1), trained_model(ref).argmax(1))
        correct = trained_model(x).argmax(1) == y
    assert not correct.all()
    # Default (any-iterate) semantics: an image misclassified before the attack is
    # already fooled and is left as it is; every other image gets the same step.
    default = FGSM()(trained_model, x, y, eps).x_adv
    assert torch.equal(default[~correct], x[~correct])
    assert torch.allclose(default[correct], ref[correct], atol=1e-6)


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_bim_final_iterate_matches_torchattacks(trained_model, batch, eps):
    x, y = batch
    ours = BIM(steps=10, step_size=eps / 10, final_iterate=True)(trained_model, x, y, eps)
    ref = torchattacks.BIM(trained_model, eps=eps, alpha=eps / 10, steps=10)(x, y)
    assert torch.allclose(ours.x_adv, ref, atol=1e-6)
    with torch.no_grad():
        ref_fooled = trained_model(ref).argmax(1) != y
    assert torch.equal(ours.success, ref_fooled)


def test_pgd_final_iterate_agrees_with_torchattacks(trained_model, batch):
    x, y = batch
    eps, alpha = 0.1, 0.025
    ours = PGD(steps=10, step_size=alpha, final_iterate=True)(trained_model, x, y, eps)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ref = torchattacks.PGD(trained_model, eps=eps, alpha=alpha, steps=10, random_start=True)(x, y)
    with torch.no_grad():
        ref_acc = (trained_model(ref).argmax(1) == y).float().mean().item()
    ours_acc = 1 - ours.success.float().mean().item()
    # Different random starts: the accuracies agree within sampling noise, not bit for bit.
    assert abs(ours_acc - ref_acc) <= 0.03


def test_ta_adapter_in_a_suite_equals_native_fgsm(trained_model, test_tensors):
    suite = {
        "name": "parity",
        "attacks": [
            {"attack": "fgsm", "eps": [0.1]},
            {"attack": "ta.FGSM", "eps": [0.1]},
        ],
    }
    before = torch.get_rng_state()
    doc = evaluate(trained_model, test_tensors, suite, device="cpu").doc
    assert torch.equal(before, torch.get_rng_state())
    native, adapter = doc["attacks"]
    assert adapter["attack"] == "ta.FGSM"
    assert native["accuracy"] == adapter["accuracy"]
    assert native["n"] == adapter["n"] == len(test_tensors[1])
