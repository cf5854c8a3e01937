"""APGD (robench.attacks.apgd): fidelity to torchattacks, batch-size invariance, strength, suites."""

from __future__ import annotations

import json

import pytest
import torch

from robench.attacks import ATTACKS
from robench.attacks.apgd import APGD, DLR, checkpoints

from cli_helpers import RowByRow, invoke, one_error_line

EPS = 0.1  # the digits CNN keeps about half its accuracy under PGD-10 here


def robust_accuracy(success: torch.Tensor) -> float:
    return 1.0 - success.float().mean().item()


def test_registered_with_the_paper_defaults():
    assert ATTACKS.get("apgd") is APGD
    params = APGD.Params()
    assert (params.steps, params.loss, params.rho, params.alpha, params.random_start, params.restarts) == \
        (100, "ce", 0.75, 0.75, True, 1)
    assert APGD.cost(APGD.Params(steps=20, restarts=3)).gradient == 60
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert isinstance(APGD(loss="dlr").loss, DLR)


def test_dlr_loss_by_hand():
    z = torch.tensor([[3.0, 1.0, 0.0, -1.0], [1.0, 4.0, 2.0, 0.0]])
    y = torch.tensor([0, 0])
    # correct: -(3 - 1) / (3 - 0); wrong: -(1 - 4) / (4 - 1)
    assert DLR()(z, y).tolist() == pytest.approx([-2.0 / 3.0, 1.0])
    assert DLR().fooled(z, y).tolist() == [False, True]
    with pytest.raises(Exception, match="at least 3 classes"):
        DLR()(z[:, :2], y)


def test_robust_accuracy_matches_torchattacks(trained_model, test_tensors):
    """Mean over three seeds: one seed's random start alone moves robust accuracy by about a point."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = test_tensors[0][:200], test_tensors[1][:200]
    ours, ref = [], []
    for seed in range(3):
        ours.append(robust_accuracy(APGD(steps=100, seed=seed)(trained_model, x, y, EPS).success))
        adv = torchattacks.APGD(trained_model, norm="Linf", eps=EPS, steps=100, n_restarts=1, loss="ce", rho=0.75,
                                seed=seed)(x, y)
        with torch.no_grad():
            ref.append((trained_model(adv).argmax(dim=1) == y).float().mean().item())
    assert abs(sum(ours) / 3 - sum(ref) / 3) <= 0.005 + 1e-9, (ours, ref)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_identical_for_any_batch_size_and_refill(trained_model, test_tensors, loss):
    """The whole schedule is per sample: exact for every packing where the model's floats are."""
    x, y = test_tensors[0][:32], test_tensors[1][:32]
    attack, model = APGD(steps=20, loss=loss, restarts=2), RowByRow(trained_model)
    base = attack(model, x, y, EPS, batch_size=len(x), refill=False)
    assert 0 < int(base.success.sum()) < len(x)
    for batch_size, refill in [(7, True), (7, False), (len(x), True)]:
        other = attack(model, x, y, EPS, batch_size=batch_size, refill=refill)
        assert torch.equal(other.x_adv, base.x_adv) and torch.equal(other.success, base.success)
        assert (other.gradient_evals, other.forward_evals) == (base.gradient_evals, base.forward_evals)
    few = slice(0, 12)
    single = attack(model, x[few], y[few], EPS, torch.arange(12), batch_size=1)
    assert torch.equal(single.x_adv, base.x_adv[few]) and torch.equal(single.success, base.success[few])


def test_packings_agree_on_the_batched_model(trained_model, test_tensors):
    """On the batched model the CPU kernels change the loss's last bits with the batch size, and a
    near-tie in a loss comparison (best point, rises) can then go the other way for a sample."""
    x, y = test_tensors[0][:60], test_tensors[1][:60]
    attack = APGD(steps=30, restarts=2)
    base = attack(trained_model, x, y, EPS, batch_size=len(x), refill=False)
    other = attack(trained_model, x, y, EPS, batch_size=7, refill=True)
    assert int((other.success != base.success).sum()) <= 2
    assert int((other.x_adv != base.x_adv).flatten(1).any(dim=1).sum()) <= 3


def test_stronger_than_pgd_and_inside_the_ball(trained_model, test_tensors):
    x, y = test_tensors[0][:200], test_tensors[1][:200]
    pgd = ATTACKS.get("pgd")(steps=10)(trained_model, x, y, EPS)
    for norm, eps in [("linf", EPS), ("l2", 1.0)]:
        result = APGD(steps=50, norm=norm)(trained_model, x, y, eps)
        assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
        delta = (result.x_adv - x).flatten(1)
        size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= eps + 1e-6
        if norm == "linf":
            assert robust_accuracy(result.success) <= robust_accuracy(pgd.success)
        else:
            assert robust_accuracy(result.success) < 1.0 - 0.1  # the L2 step does something too


def test_suite_entry_runs_and_typos_are_named(tmp_path):
    suite = tmp_path / "apgd.yaml"
    suite.write_text("name: apgd-digits\nattacks:\n  - attack: apgd\n    eps: 0.1\n    steps: 20\n    loss: dlr\n")
    result = invoke("eval", "example:digits", "--data", "example:digits", "--limit", 60, "--suite", suite,
                    "--out", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    assert "apgd" in json.dumps(json.loads(result.stdout))
    typo = tmp_path / "typo.yaml"
    typo.write_text("name: apgd-digits\nattacks:\n  - attack: apgd\n    eps: 0.1\n    stepz: 20\n")
    bad = invoke("eval", "example:digits", "--data", "example:digits", "--limit", 60, "--suite", typo,
                 "--out", tmp_path / "bad")
    assert bad.exit_code == 2
    assert "typo.yaml:5 attacks[0].stepz" in one_error_line(bad)
