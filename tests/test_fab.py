"""FAB-T (robench.attacks.fab): the reference's projections and verdicts, the threat model, batch-size invariance.

The digits CNN is small but FAB-T makes two passes per step for each of 9 targets: the tests
use 10 steps (robust accuracy at EPS is within 2 points of 100 steps'), 3 targets where the
property does not depend on their number, and subsets of the test images; the comparison
with torchattacks runs 300 images, all 9 targets, and the same step count on both sides.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from robench.attacks import ATTACKS
from robench.attacks.fab import FABTargeted, boundary_step, stable_order
from robench.attacks.fab_untargeted import FAB
from robench.attacks.objectives import Objective
from robench.errors import UsageError

from cli_helpers import RowByRow, invoke

EPS = 0.13  # FAB-T with 10 steps leaves about 30% of the first 300 digits robust in L-inf
EPS_L2 = 0.5  # and about 58% in L2
STEPS = 10


def robust_accuracy(success: torch.Tensor) -> float:
    return 1.0 - success.float().mean().item()


def test_registered_with_the_autoattack_defaults():
    assert ATTACKS.get("fab-t") is FABTargeted and FABTargeted.name == "fab-t"
    params = FABTargeted.Params()
    # AutoAttack's standard version: 100 steps, 9 target classes, 1 restart; FAB's own defaults.
    assert (params.steps, params.targets, params.restarts, params.alpha_max, params.eta, params.beta) == \
        (100, 9, 1, 0.1, 1.05, 0.9)
    cost = FABTargeted.cost(FABTargeted.Params(steps=20, targets=3, restarts=2))
    assert (cost.gradient, cost.forward) == (120, 121)
    assert FABTargeted.iterative() and FABTargeted.eps_budget == "required"
    assert FABTargeted.norms == ("linf", "l2")
    with pytest.raises(UsageError, match="beta"):
        FABTargeted(beta=0.0)
    with pytest.raises(UsageError, match="norm"):
        FABTargeted(norm="l1")


def test_refuses_objectives_and_semantics_it_does_not_have():
    with pytest.raises(UsageError, match="classifiers"):
        FABTargeted(loss=Objective())
    with pytest.raises(UsageError, match="final_iterate"):
        FABTargeted(final_iterate=True)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_boundary_step_by_hand(norm):
    # <w, p + d> = 0.2 from p = (0.1, 0.5): the first coordinate hits 0 after 0.1, the second moves 0.3.
    points, w, b = torch.tensor([[0.1, 0.5]]), torch.tensor([[1.0, 1.0]]), torch.tensor([0.2])
    assert boundary_step(points, w, b, norm)[0].tolist() == pytest.approx([-0.1, -0.3])
    # From the other side of the hyperplane the step goes up; w = 0 leaves a coordinate alone.
    points, w, b = torch.tensor([[0.5, 0.5, 0.5]]), torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([1.5])
    assert boundary_step(points, w, b, norm)[0].tolist() == pytest.approx([0.25, 0.25, 0.0])
    # Out of reach within the box: the corner nearest the hyperplane.
    points, w, b = torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, -2.0]]), torch.tensor([-5.0])
    assert boundary_step(points, w, b, norm)[0].tolist() == pytest.approx([-0.5, 0.5])


@pytest.mark.parametrize("columns", [64, 3 * 32 * 32])
def test_the_knees_order_is_the_stable_sort(columns):
    """The integer keys give the stable float sort's permutation: ties (zeros, rounded values) in column order,
    -0.0 tied with +0.0, infinities last; NaN falls back to the float sort."""
    gen = torch.Generator().manual_seed(columns)
    knee = torch.rand(300, columns, generator=gen)
    knee[knee < 0.3] = 0.0
    knee[::7, ::5] = -0.0
    knee[::3] = knee[::3].round(decimals=1)
    knee[1, :3] = torch.inf
    assert torch.equal(stable_order(knee), torch.sort(knee, dim=1, stable=True).indices)
    knee[2, 4] = torch.nan
    assert torch.equal(stable_order(knee), torch.sort(knee, dim=1, stable=True).indices)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_boundary_step_matches_the_reference_projection(norm):
    """Rows with pixels on the box faces, zero weights, and hyperplanes in and out of reach."""
    fab = pytest.importorskip("torchattacks.attacks.fab")
    reference = fab.projection_linf if norm == "linf" else fab.projection_l2
    g = torch.Generator().manual_seed(0)
    n, dim = 256, 64
    points = torch.rand(n, dim, generator=g)
    points[torch.rand(n, dim, generator=g) < 0.4] = 0.0
    points[torch.rand(n, dim, generator=g) < 0.1] = 1.0
    w = torch.randn(n, dim, generator=g)
    w[torch.rand(n, dim, generator=g) < 0.1] = 0.0
    b = (w * torch.rand(n, dim, generator=g)).sum(1)  # through a point of the box: reachable
    beyond = torch.arange(n) % 4 == 0
    b[beyond] += 2 * w[beyond].abs().sum(1)  # farther than any point of the box
    ours = boundary_step(points, w, b, norm)
    theirs = reference(points.clone(), w.clone(), b.clone())
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    on_plane = ((w * (points + ours)).sum(1) - b).abs() < 1e-4
    assert torch.equal(on_plane, ~beyond)
    assert float((points + ours).min()) >= 0.0 and float((points + ours).max()) <= 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_start_from_the_logits_one_hot_as_autograd_does(trained_model, test_tensors, dtype):
    """FAB-T's gap and FAB's Jacobian hand the model the +-1 columns autograd's indexing would: the same bits."""
    model = copy.deepcopy(trained_model).to(dtype)
    x, y = test_tensors
    generator = torch.Generator().manual_seed(0)
    xb = (x[:100] + (torch.rand(x[:100].shape, generator=generator) - 0.5) * 0.5).clamp(0, 1)
    y = y[:100]
    target = (y + torch.randint(1, 10, (100,), generator=generator)) % 10
    rows = torch.arange(100)
    xa = xb.clone().requires_grad_(True)
    logits = model(xa.to(dtype)).float()
    expected_gap = logits[rows, target] - logits[rows, y]
    (expected,) = torch.autograd.grad(expected_gap.sum(), xa, retain_graph=True)
    gap, grad = FABTargeted()._logit_gap_and_grad(model, xb, torch.stack([target, y], dim=1), dtype)
    assert torch.equal(gap, expected_gap.detach()) and torch.equal(grad, expected) and grad.abs().sum() > 0
    columns = [torch.autograd.grad(logits[:, k].sum(), xa, retain_graph=True)[0] for k in range(10)]
    gaps, jacobian, _ = FAB().gaps_and_gradients(model, xb, y, dtype)
    expected_jacobian = torch.stack(columns, dim=1)
    assert torch.equal(jacobian, expected_jacobian - expected_jacobian[rows, y].unsqueeze(1))
    assert torch.equal(gaps, (logits - logits[rows, y].unsqueeze(1)).detach())


def test_robust_accuracy_matches_torchattacks(trained_model, test_tensors):
    """No random start with one restart: the same iterates up to float rounding, sample by sample."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = test_tensors[0][:300], test_tensors[1][:300]
    ours = FABTargeted(steps=STEPS)(trained_model, x, y, EPS)
    adv = torchattacks.FAB(trained_model, norm="Linf", eps=EPS, steps=STEPS, n_restarts=1, alpha_max=0.1, eta=1.05,
                           beta=0.9, multi_targeted=True, n_classes=10, seed=0)(x, y)
    trained_model.zero_grad(set_to_none=True)  # torchattacks' FAB leaves them; the model is the session's
    with torch.no_grad():
        theirs = trained_model(adv).argmax(dim=1) == y
    ours_robust = ~ours.success
    assert 0.2 <= robust_accuracy(ours.success) <= 0.8
    assert abs(robust_accuracy(ours.success) - theirs.float().mean().item()) <= 0.02, \
        (robust_accuracy(ours.success), theirs.float().mean().item())
    assert int((ours_robust != theirs).sum()) <= 3


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", EPS_L2)])
def test_outputs_inside_the_threat_model(trained_model, test_tensors, norm, eps):
    x, y = test_tensors[0][:100], test_tensors[1][:100]
    result = FABTargeted(steps=STEPS, targets=3, norm=norm)(trained_model, x, y, eps)
    assert float(result.x_adv.min()) >= 0.0 and float(result.x_adv.max()) <= 1.0
    delta = (result.x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-6
    with torch.no_grad():
        predicted = trained_model(result.x_adv).argmax(dim=1)
        clean = trained_model(x).argmax(dim=1) == y
    # The verdicts the attack handed over are those of the returned points.
    assert torch.equal(result.success, predicted != y)
    assert 0.0 < robust_accuracy(result.success) <= clean.float().mean().item()
    assert robust_accuracy(result.success) < 0.9  # it does break points
    # Points it did not break come back unchanged (found adversarial points beyond eps are dropped).
    assert torch.equal(result.x_adv[~result.success], x[~result.success])


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_random_start_at_half_eps(norm):
    attack = FABTargeted(norm=norm, restarts=2, seed=3)
    x0 = torch.full((4, 1, 8, 8), 0.5)
    start = attack._random_start(x0, torch.arange(4), 1, 0.2)
    size = (start - x0).flatten(1)
    size = size.abs().amax(dim=1) if norm == "linf" else size.norm(dim=1)
    assert size.tolist() == pytest.approx([0.1] * 4)
    assert torch.equal(start[2:], attack._random_start(x0[2:], torch.arange(2, 4), 1, 0.2))
    assert not torch.equal(start, attack._random_start(x0, torch.arange(4), 2, 0.2))


def test_identical_for_any_batch_size_and_refill(test_tensors, trained_model):
    """Every sample's run is its own: exact for every packing where the model's floats are (one image at a
    time); two restarts put random starts in play. A second restart only adds runs, so it breaks a superset."""
    x, y = test_tensors[0][:24], test_tensors[1][:24]
    model = RowByRow(trained_model)
    attack = FABTargeted(steps=5, targets=3, restarts=2)
    base = attack(model, x, y, 0.1, batch_size=len(x), refill=False)
    assert 0 < int(base.success.sum()) < len(x)
    for batch_size, refill in [(7, True), (7, False), (1, True)]:
        other = attack(model, x, y, 0.1, batch_size=batch_size, refill=refill)
        assert torch.equal(other.x_adv, base.x_adv) and torch.equal(other.success, base.success)
        assert (other.gradient_evals, other.forward_evals) == (base.gradient_evals, base.forward_evals)
    few = torch.arange(5, 17)
    part = attack(model, x[few], y[few], 0.1, few, batch_size=4)
    assert torch.equal(part.x_adv, base.x_adv[few]) and torch.equal(part.success, base.success[few])
    once = FABTargeted(steps=5, targets=3)(model, x, y, 0.1)
    assert bool((base.success | ~once.success).all())


def test_batch_sizes_agree_on_the_batched_model(trained_model, test_tensors):
    """On the batched model the CPU kernels change the last bits with the batch size, which moves the
    iterates a little; the verdicts stay the same."""
    x, y = test_tensors[0][:150], test_tensors[1][:150]
    attack = FABTargeted(steps=STEPS, targets=3)
    verdicts = [attack(trained_model, x, y, EPS, batch_size=size).success for size in (7, 64, 150)]
    assert torch.equal(verdicts[0], verdicts[2]) and torch.equal(verdicts[1], verdicts[2])


def test_one_target_is_the_clean_runner_up(trained_model, test_tensors):
    x, y = test_tensors[0][:150], test_tensors[1][:150]
    result = FABTargeted(steps=STEPS, targets=1)(trained_model, x, y, EPS)
    with torch.no_grad():
        clean = trained_model(x)
        predicted = trained_model(result.x_adv).argmax(dim=1)
    runner_up = clean.topk(2, dim=1).indices[:, 1]
    broken = result.success & (clean.argmax(dim=1) == y)
    assert int(broken.sum()) >= 30
    assert (predicted[broken] == runner_up[broken]).float().mean().item() > 0.5
    # More targets break more points.
    assert robust_accuracy(FABTargeted(steps=STEPS, targets=3)(trained_model, x, y, EPS).success) < \
        robust_accuracy(result.success)


def test_suite_entry_runs(tmp_path):
    suite = tmp_path / "fab.yaml"
    suite.write_text("name: fab-digits\nattacks:\n  - attack: fab-t\n    eps: [0.1, 0.2]\n    steps: 5\n"
                     "    targets: 2\n")
    result = invoke("eval", "example:digits", "--data", "example:digits", "--limit", 60, "--suite", suite,
                    "--out", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    entries = [a for a in json.loads(result.stdout)["attacks"] if a["attack"] == "fab-t"]
    assert [e["eps"] for e in entries] == [0.1, 0.2]
    assert entries[0]["accuracy"] >= entries[1]["accuracy"]
    assert entries[0]["params"]["targets"] == 2
