"""Hierarchical feature alignment (paper 003): Sinkhorn against POT, the heads, the loss, FeatureTap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robench.defenses.features import FeatureTap
from robench.defenses.hfa import (
    AlignmentHead,
    HierarchicalAlignment,
    entropic_plan,
    hierarchical_alignment_loss,
    sinkhorn_distance,
    squared_distances,
)
from robench.errors import UsageError

ot = pytest.importorskip("ot")  # POT is a dev dependency, used only as the reference here


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Sinkhorn here is thousands of tiny ops: on a busy 2-core machine the intra-op thread
    hand-offs cost far more than the work (2000 iterations: 0.09 s on one thread, 4.6 s on two)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_clouds(seed: int, batch: int, n: int, m: int, d: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, n, d, generator=g, dtype=dtype)
    y = torch.rand(batch, m, d, generator=g, dtype=dtype)
    return x, y


def exact_w2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """POT's exact transport cost (network simplex) for each pair of uniform clouds."""
    n, m = x.shape[1], y.shape[1]
    cost = squared_distances(x, y).numpy()
    return torch.tensor([ot.emd2(np.full(n, 1 / n), np.full(m, 1 / m), c) for c in cost], dtype=torch.float64)


# --- sinkhorn_distance ------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m", "d", "seed"), [(5, 7, 2, 0), (8, 6, 3, 1), (6, 6, 2, 2)])
def test_sinkhorn_reaches_exact_emd_at_small_eps(n, m, d, seed):
    x, y = random_clouds(seed, 6, n, m, d)
    distance = sinkhorn_distance(x, y, eps=1e-3, iters=20000)
    assert (distance - exact_w2(x, y)).abs().max() < 1e-3


def test_sinkhorn_error_shrinks_with_eps():
    x, y = random_clouds(3, 5, 7, 6, 2)
    exact = exact_w2(x, y)
    schedule = [(0.1, 300), (0.03, 1000), (0.01, 3000), (0.003, 10000)]
    errors = torch.stack([sinkhorn_distance(x, y, eps, iters) - exact for eps, iters in schedule])
    # The regularised plan costs at least the optimum and its cost falls with eps (Eq. 5).
    assert (errors > -1e-9).all()
    assert (errors[1:] < errors[:-1]).all()
    assert errors[0].min() > 1e-3  # eps = 0.1 is visibly biased on O(1) costs, so the test can fail


def test_plan_matches_pot_sinkhorn_at_paper_eps():
    x, y = random_clouds(4, 3, 6, 8, 3)
    cost = squared_distances(x, y)
    plan = entropic_plan(cost, eps=0.1, iters=2000)
    a, b = np.full(6, 1 / 6), np.full(8, 1 / 8)
    for ours, c in zip(plan, cost.numpy()):
        reference = ot.sinkhorn(a, b, c, reg=0.1, numItermax=100000, stopThr=1e-15)
        assert np.abs(ours.numpy() - reference).max() < 1e-6
    assert torch.allclose(plan.sum(2), torch.full((3, 6), 1 / 6, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(plan.sum(1), torch.full((3, 8), 1 / 8, dtype=torch.float64), atol=1e-12)


def test_identical_clouds_distance_vanishes_with_eps():
    x, _ = random_clouds(5, 4, 6, 6, 2)
    schedule = [(0.1, 300), (0.01, 3000), (1e-3, 20000)]
    distances = [sinkhorn_distance(x, x.clone(), eps, iters) for eps, iters in schedule]
    assert (distances[0] > 1e-3).all()  # the entropic bias at the paper's eps on unit-scale points
    assert (distances[1] < distances[0]).all() and (distances[2] < distances[1]).all()
    assert distances[2].max() < 1e-3


def test_sinkhorn_is_symmetric():
    x, y = random_clouds(6, 4, 5, 7, 3)
    assert torch.allclose(sinkhorn_distance(x, y, iters=1000), sinkhorn_distance(y, x, iters=1000), atol=1e-10)


def test_batched_equals_pairwise_and_2d_gives_scalar():
    x, y = random_clouds(7, 5, 6, 4, 2)
    batched = sinkhorn_distance(x, y)
    assert batched.shape == (5,)
    for i in range(5):
        single = sinkhorn_distance(x[i], y[i])
        assert single.dim() == 0
        assert torch.allclose(single, batched[i], rtol=0, atol=1e-12)


def test_large_costs_stay_finite_with_gradients():
    x, y = random_clouds(8, 3, 8, 8, 4, dtype=torch.float32)
    x = (x * 100).requires_grad_()
    y = (y * 100).requires_grad_()
    cost = squared_distances(x, y).detach()
    # The plain Gibbs kernel underflows here: only the log domain can run this case.
    assert torch.exp(-cost / 0.1).max() == 0
    distance = sinkhorn_distance(x, y, eps=0.1, iters=100)
    distance.sum().backward()
    assert torch.isfinite(distance).all()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all() and x.grad.abs().sum() > 0
    # In float64 the plan is still a proper coupling on its exact (column) marginal;
    # float32 keeps only ~1e-2 relative precision in exp(f + g - C/eps) when C/eps ~ 1e5.
    plan = entropic_plan(cost.double(), eps=0.1, iters=100)
    assert torch.isfinite(plan).all()
    assert torch.allclose(plan.sum(1), torch.full((3, 8), 1 / 8, dtype=torch.float64), atol=1e-12)


def test_half_precision_and_autocast_compute_in_float32():
    x, y = random_clouds(9, 2, 5, 5, 3, dtype=torch.float32)
    reference = sinkhorn_distance(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = sinkhorn_distance(x, y)
    assert under_autocast.dtype == torch.float32
    assert torch.allclose(under_autocast, reference, rtol=1e-6)
    from_bf16 = sinkhorn_distance(x.bfloat16(), y.bfloat16())
    assert from_bf16.dtype == torch.float32
    assert torch.allclose(from_bf16, reference, rtol=2e-2)


def test_sinkhorn_rejects_bad_arguments():
    x, y = random_clouds(10, 2, 4, 4, 2)
    with pytest.raises(UsageError, match="same batch size"):
        sinkhorn_distance(x, y[:1])
    with pytest.raises(UsageError, match="both"):
        sinkhorn_distance(x, y[0])
    with pytest.raises(UsageError, match="eps"):
        sinkhorn_distance(x, y, eps=0.0)


# --- heads and the alignment term ---------------------------------------------------------


def test_alignment_head_output_shapes():
    torch.manual_seed(0)
    assert AlignmentHead((6, 5, 5))(torch.randn(3, 6, 5, 5)).shape == (3, 25, 3)  # C' = C//2, L' = H*W
    assert AlignmentHead((16, 10, 10))(torch.randn(2, 16, 10, 10)).shape == (2, 64, 8)  # L' capped at 64
    assert AlignmentHead((1, 1, 1))(torch.randn(2, 1)).shape == (2, 1, 1)
    assert AlignmentHead((8, 4, 4), channels_out=5, nodes_out=3)(torch.randn(2, 8, 4, 4)).shape == (2, 3, 5)
    with pytest.raises(UsageError, match="built for features"):
        AlignmentHead((6, 5, 5))(torch.randn(3, 6, 4, 4))


def feature_pair(seed: int, shape=(4, 8, 6, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def test_alignment_grows_with_the_feature_perturbation():
    torch.manual_seed(1)
    alignment = HierarchicalAlignment([(8, 6, 6)])
    features, direction = feature_pair(2)
    with torch.no_grad():
        losses = torch.stack([alignment([features], [features + s * direction]) for s in [0.0, 0.5, 1.0, 2.0, 4.0]])
    assert (losses[1:] > losses[:-1]).all()
    assert losses[-1] > 2 * losses[0]


def test_alignment_of_identical_features_vanishes_as_eps_shrinks():
    torch.manual_seed(3)
    coarse = HierarchicalAlignment([(8, 6, 6)], eps=0.1, iters=100)
    fine = HierarchicalAlignment([(8, 6, 6)], eps=1e-3, iters=2000)
    fine.load_state_dict(coarse.state_dict())
    features, direction = feature_pair(4)
    with torch.no_grad():
        same_coarse, same_fine = coarse([features], [features]), fine([features], [features])
        perturbed_fine = fine([features], [features + direction])
    assert same_fine < 0.1 * same_coarse
    assert same_fine < 0.1 * perturbed_fine


def test_lambda_scales_the_alignment_linearly():
    torch.manual_seed(5)
    shapes = [(8, 6, 6), (4, 3, 3)]
    base = HierarchicalAlignment(shapes, lam=1.0)
    scaled = HierarchicalAlignment(shapes, lam=2.5)
    scaled.load_state_dict(base.state_dict())
    (f1, d1), (f2, d2) = feature_pair(6), feature_pair(7, (4, 4, 3, 3))
    clean, adv = [f1, f2], [f1 + 0.5 * d1, f2 + 0.5 * d2]
    with torch.no_grad():
        one, two = base(clean, adv), scaled(clean, adv)
        layers = base.layer_distances(clean, adv)
    assert one > 0
    assert torch.allclose(two, 2.5 * one, rtol=1e-6)
    assert torch.allclose(one, layers[0] + layers[1], rtol=1e-6)
    with pytest.raises(UsageError, match="expected 2"):
        base([f1], [f1])


class TinyCNN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(1, 4, 3, padding=1),  # "0"
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3, padding=1),  # "3"
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(6 * 4 * 4, 10),  # "6"
        )


def test_gradients_reach_heads_and_backbone():
    torch.manual_seed(7)
    model = TinyCNN()
    g = torch.Generator().manual_seed(8)
    x = torch.rand(5, 1, 8, 8, generator=g)
    x_adv = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    y = torch.randint(0, 10, (5,), generator=g)
    alignment = HierarchicalAlignment.for_model(model, ["0", "3"], x)
    with FeatureTap(model, ["0", "3"]) as tap:
        logits_clean = model(x)
        clean_feats = tap.features
        logits_adv = model(x_adv)
        adv_feats = tap.features
    assert clean_feats[0] is not adv_feats[0]

    alignment(clean_feats, adv_feats).backward(retain_graph=True)
    for name, parameter in list(alignment.named_parameters()) + list(model[0].named_parameters()):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert model[6].weight.grad is None  # the features are read before the classifier

    total, parts = hierarchical_alignment_loss(logits_clean, logits_adv, y, clean_feats, adv_feats, alignment)
    assert set(parts) == {"ce_clean", "ce_adv", "alignment"}
    assert parts["ce_clean"] == pytest.approx(F.cross_entropy(logits_clean, y).item())
    assert parts["ce_adv"] == pytest.approx(F.cross_entropy(logits_adv, y).item())
    assert total.item() == pytest.approx(sum(parts.values()), rel=1e-6)


def test_for_model_sizes_heads_and_restores_modes():
    model = TinyCNN().train()
    model[3].eval()  # a submodule in its own mode must keep it
    alignment = HierarchicalAlignment.for_model(model, ["0", "3", "6"], torch.zeros(2, 1, 8, 8), lam=0.5)
    assert [head.feature_shape for head in alignment.heads] == [(4, 8, 8), (6, 4, 4), (10, 1, 1)]
    assert alignment.lam == 0.5
    assert model.training and model[0].training and not model[3].training
    assert all(not module._forward_hooks for module in model.modules())


# --- FeatureTap -----------------------------------------------------------------------------


def test_feature_tap_records_in_the_given_order_with_gradients():
    torch.manual_seed(9)
    model = TinyCNN()
    x = torch.rand(2, 1, 8, 8)
    tap = FeatureTap(model, ["3", "0"])
    model(x)
    first_conv = model[0](x)
    second_conv = model[3](model[2](model[1](first_conv)))
    assert torch.equal(tap.features[0], second_conv) and torch.equal(tap.features[1], first_conv)
    assert all(f.requires_grad and f.grad_fn is not None for f in tap.features)
    tap.clear()
    with pytest.raises(UsageError, match="no output recorded"):
        tap.features
    tap.close()


def test_feature_tap_unknown_name_suggests_a_layer():
    model = nn.Sequential()
    model.add_module("features", nn.Conv2d(1, 2, 3))
    model.add_module("classifier", nn.Linear(2, 2))
    with pytest.raises(UsageError, match="'feature'.*did you mean 'features'"):
        FeatureTap(model, ["features", "feature"])
    assert not model.features._forward_hooks  # nothing hooked when one name is wrong


def test_feature_tap_close_removes_the_hooks():
    model = TinyCNN()
    with FeatureTap(model, ["0", "3"]) as tap:
        assert len(model[0]._forward_hooks) == 1 and len(model[3]._forward_hooks) == 1
        model(torch.rand(1, 1, 8, 8))
    assert not model[0]._forward_hooks and not model[3]._forward_hooks
    model(torch.rand(1, 1, 8, 8))
    with pytest.raises(UsageError):
        tap.features
