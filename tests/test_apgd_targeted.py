"""APGD-T (robench.attacks.apgd_targeted): the targeted DLR loss, the targets, parity with torchattacks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from robench.attacks import ATTACKS
from robench.attacks.apgd import DLR
from robench.attacks.apgd_targeted import APGDTargeted, TargetedDLR
from robench.attacks.driver import RunContext
from robench.attacks.objectives import Unscored
from robench.errors import UsageError
from cli_helpers import RowByRow, invoke
from test_apgd import PARITY_IMAGES, clean_correct, drawing_robench_starts, sizes

EPS = 0.13  # APGD-T leaves the digits CNN about a quarter of its accuracy (0.1 would double the runtime)


class FixedLogits(nn.Module):
    """Logits that do not depend on the input (zero gradient): nothing is ever fooled, every run is made."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)] + 0.0 * x.flatten(1).sum(dim=1, keepdim=True)


class Counting(nn.Module):
    """Counts the rows the model sees with and without autograd."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.gradient_rows = self.forward_rows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            self.gradient_rows += len(x)
        else:
            self.forward_rows += len(x)
        return self.model(x)


def test_registered_with_the_reference_defaults():
    assert ATTACKS.get("apgd-t") is APGDTargeted
    params = APGDTargeted.Params()
    assert (params.targets, params.steps, params.restarts, params.rho, params.eot, params.random_start) == \
        (9, 100, 1, 0.75, 1, True)
    assert "loss" not in APGDTargeted.Params.model_fields
    cost = APGDTargeted.cost(params)
    assert (cost.gradient, cost.forward) == (900, 2)
    assert APGDTargeted.cost(APGDTargeted.Params(targets=3, steps=10, restarts=2, eot=4)).gradient == 240
    assert (APGDTargeted.family, APGDTargeted.norms, APGDTargeted.eps_budget, APGDTargeted.iterative()) == \
        ("gradient", ("linf", "l2"), "required", True)
    described = APGDTargeted().describe(0.1)
    assert (described["targets"], described["restarts"], described["steps"]) == (9, 1, 100)
    assert isinstance(APGDTargeted().loss, TargetedDLR)
    with pytest.raises(UsageError, match="apgd-t: the dlr-targeted loss is for classifiers"):
        APGDTargeted(loss=Unscored())


def test_targeted_dlr_loss_by_hand():
    z = torch.tensor([[5.0, 3.0, 1.0, 0.0, -1.0], [1.0, 4.0, 2.0, 0.0, -2.0]])
    labels = torch.tensor([[0, 1], [0, 2]])  # (true class, target)
    # -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2): -(5 - 3) / (5 - 0.5); -(1 - 2) / (4 - 0.5)
    assert TargetedDLR()(z, labels).tolist() == pytest.approx([-2.0 / 4.5, 1.0 / 3.5])
    assert TargetedDLR().fooled(z, torch.tensor([0, 0])).tolist() == [False, True]  # misclassified, any class
    with pytest.raises(UsageError, match="at least 4 classes"):
        TargetedDLR()(z[:, :3], labels)


def moved_batches(test_tensors, count: int = 6):
    """Test images moved by growing random noise (so some are misclassified), with labels and other classes."""
    x, y = test_tensors
    generator = torch.Generator().manual_seed(0)
    for k in range(count):
        xb = (x[:120] + (torch.rand(x[:120].shape, generator=generator) - 0.5) * 0.25 * k).clamp(0, 1)
        other = (y[:120] + torch.randint(1, 10, (120,), generator=generator)) % 10
        yield xb, y[:120], other


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("objective", [TargetedDLR(), DLR()], ids=["dlr-targeted", "dlr"])
def test_direct_loss_gradients_are_autograds_bit_for_bit(trained_model, test_tensors, objective, dtype):
    """The DLR losses hand the model autograd's own gradient, worked out without recording the loss."""
    model = copy.deepcopy(trained_model).to(dtype)
    for xb, y, other in moved_batches(test_tensors):
        labels = torch.stack([y, other], dim=1) if isinstance(objective, TargetedDLR) else y
        x_auto, x_direct = (xb.to(dtype).requires_grad_(True) for _ in range(2))
        losses = objective(model(x_auto), labels)
        (expected,) = torch.autograd.grad(losses.sum(), x_auto)
        outputs = model(x_direct)
        direct, output_grad = objective.losses_and_output_grad(outputs.detach(), labels)
        (grad,) = torch.autograd.grad(outputs, x_direct, output_grad)
        assert torch.equal(direct, losses.detach()) and torch.equal(grad, expected)
        assert torch.equal(torch.signbit(grad), torch.signbit(expected))
        assert grad.abs().sum() > 0
    # Tied logits: the top-k's order among equals is the one the loss used.
    z = torch.randint(0, 3, (2000, 10), generator=torch.Generator().manual_seed(1)).float().requires_grad_(True)
    y = torch.arange(2000) % 10
    labels = torch.stack([y, (y + 1 + torch.arange(2000) % 9) % 10], dim=1) if isinstance(objective, TargetedDLR) else y
    (expected,) = torch.autograd.grad(objective(z, labels).sum(), z)
    assert torch.equal(objective.losses_and_output_grad(z.detach(), labels)[1], expected)


def test_targets_are_the_highest_other_clean_logits():
    logits = torch.tensor([[9.0, 1.0, 5.0, 7.0, 3.0],  # correct: 3, 2, 4, 1 (second highest first)
                           [2.0, 8.0, 6.0, 0.0, 4.0]])  # misclassified: the true class 0 is never a target
    y = torch.tensor([0, 0])
    attack = APGDTargeted(targets=9)
    context = RunContext(torch.arange(2), batch_size=2)  # the model's rows are the batch's positions
    targets = attack.ranked_targets(FixedLogits(logits), torch.zeros(2, 1, 2, 2), y, context)
    assert targets.tolist() == [[3, 2, 4, 1], [1, 2, 4, 3]]  # min(9, 5 - 1) = 4 targets
    assert APGDTargeted(targets=2).ranked_targets(FixedLogits(logits), torch.zeros(2, 1, 2, 2), y,
                                                  context).tolist() == [[3, 2], [1, 2]]
    # Restart k of the loop is the k // restarts-th target.
    attack = APGDTargeted(targets=2, restarts=2)
    attack._targets = targets[:, :2]
    rows = torch.tensor([0, 0, 1, 1])
    labels = attack.loss_labels(y[rows], rows, torch.tensor([0, 3, 1, 2]))
    assert labels.tolist() == [[0, 3], [0, 2], [0, 1], [0, 2]]


def test_every_target_runs_and_every_pass_is_counted(test_tensors):
    x, y = test_tensors[0][:6], torch.zeros(6, dtype=torch.long)
    for classes, runs in [(10, 9), (5, 4)]:  # fewer classes: n_classes - 1 targets
        logits = torch.arange(classes, 0, -1).float().expand(6, classes)  # class 0 on top: never fooled
        model = Counting(FixedLogits(logits))
        result = APGDTargeted(steps=3)(model, x, y, EPS)
        assert not bool(result.success.any())
        assert result.gradient_evals == runs * 3 * len(x) == model.gradient_rows
        # The ranking pass, the scores at the end of every target run but the last, the base's score.
        assert result.forward_evals == model.forward_rows == len(x) + (runs - 1) * len(x) + len(x)


def test_fewer_than_four_classes_is_a_usage_error(test_tensors):
    x, y = test_tensors[0][:4], torch.zeros(4, dtype=torch.long)
    model = FixedLogits(torch.tensor([[3.0, 2.0, 1.0]]).expand(4, 3))
    with pytest.raises(UsageError, match="apgd-t needs a classifier of at least 4 classes"):
        APGDTargeted(steps=2)(model, x, y, EPS)


def test_apgd_t_matches_torchattacks(trained_model, test_tensors):
    """APGD-T at 100 steps per target, 9 targets, 1 restart vs torchattacks.APGDT(n_classes=10) on 300
    clean-correct digits, both from the same random starts: robust accuracy within half a point, sample by
    sample too (measured: 84 vs 84 robust, no sample differing; from independent random starts, seeds 0-1:
    84/84 vs 83/84)."""
    torchattacks = pytest.importorskip("torchattacks")
    x, y = clean_correct(trained_model, *test_tensors, PARITY_IMAGES)
    ours = APGDTargeted()(trained_model, x, y, EPS)
    reference = drawing_robench_starts(torchattacks.APGDT)(trained_model, norm="Linf", eps=EPS, steps=100,
                                                           n_restarts=1, n_classes=10)
    with torch.no_grad():
        ref_robust = trained_model(reference(x, y)).argmax(dim=1) == y
    ours_robust = ~ours.success
    assert 0.2 < ours_robust.float().mean().item() < 0.8  # a comparison that can tell attacks apart
    assert abs(int(ours_robust.sum()) - int(ref_robust.sum())) <= int(0.005 * len(x))
    assert int((ours_robust != ref_robust).sum()) <= int(0.005 * len(x))
    assert float(sizes(ours.x_adv, x, "linf").max()) <= EPS + 1e-6
    assert float(ours.x_adv.min()) >= 0.0 and float(ours.x_adv.max()) <= 1.0


@pytest.mark.parametrize("norm,eps,random_start", [("linf", EPS, False), ("linf", EPS, True), ("l2", 0.5, True)])
def test_identical_for_any_batch_size_and_refill(trained_model, test_tensors, norm, eps, random_start):
    """Targets ranked and runs started per sample: exact for every packing where the model's floats are
    (a row-by-row model; 3 targets of 6 steps on 24 images keep its per-row passes affordable)."""
    x, y = test_tensors[0][:24], test_tensors[1][:24]
    attack = APGDTargeted(steps=6, targets=3, norm=norm, random_start=random_start)
    model = RowByRow(trained_model)
    base = attack(model, x, y, eps, batch_size=len(x), refill=False)
    assert 0 < int(base.success.sum()) < len(x)
    assert float(sizes(base.x_adv, x, norm).max()) <= eps + 1e-6
    for batch_size, refill in [(5, True), (5, False)]:
        other = attack(model, x, y, eps, batch_size=batch_size, refill=refill)
        assert torch.equal(other.x_adv, base.x_adv) and torch.equal(other.success, base.success)
        assert (other.gradient_evals, other.forward_evals) == (base.gradient_evals, base.forward_evals)


def test_suite_entry_runs_below_clean_accuracy(tmp_path):
    suite = tmp_path / "apgd-t.yaml"
    suite.write_text("name: apgd-t-digits\nattacks:\n  - attack: apgd-t\n    eps: 0.1\n    steps: 10\n"
                     "    targets: 3\n")
    result = invoke("eval", "example:digits", "--data", "example:digits", "--limit", 60, "--suite", suite,
                    "--out", tmp_path / "out", "--json", "--quiet")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    entry = doc["attacks"][0]
    assert entry["attack"] == "apgd-t" and entry["params"]["targets"] == 3
    assert entry["accuracy"] <= doc["clean"]["accuracy"]
    assert entry["gradient_evals"] <= 3 * 10 * doc["clean"]["correct"]
