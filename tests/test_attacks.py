"""Native attacks on a model trained during the test run on scikit-learn digits."""

from __future__ import annotations

import pytest
import torch

from robench.attacks import ATTACKS, BIM, FGSM, MIFGSM, PGD
from robench.attacks.base import Attack
from robench.errors import UsageError

TOL = 1e-6


def clean_correct(model, x, y):
    with torch.no_grad():
        keep = model(x).argmax(1) == y
    return x[keep], y[keep]


@pytest.fixture(scope="module")
def data(trained_model, test_tensors):
    return clean_correct(trained_model, *test_tensors)


class ChannelMean(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=1, keepdim=True)


def linf(delta):
    return delta.flatten(1).abs().max(dim=1).values


def l2(delta):
    return delta.flatten(1).norm(dim=1)


def accuracy_under(attack, model, x, y):
    return 1.0 - attack(model, x, y).success.float().mean().item()


@pytest.mark.parametrize(
    "attack",
    [
        FGSM(0.1),
        BIM(0.1, steps=5, step_size=0.03),
        PGD(0.1, steps=5, step_size=0.03),
        PGD(0.1, steps=5, step_size=0.03, final_iterate=True),
        MIFGSM(0.1, steps=5, step_size=0.02),
    ],
    ids=["fgsm", "bim", "pgd", "pgd-final", "mifgsm"],
)
def test_linf_results_stay_in_ball_and_image_range(attack, trained_model, data):
    x, y = data
    result = attack(trained_model, x, y)
    assert result.x_adv.shape == x.shape
    assert linf(result.x_adv - x).max() <= 0.1 + TOL
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0
    # The attacks must actually move the images (a no-op would pass the bounds).
    assert linf(result.x_adv - x).max() > 0.05


def test_l2_pgd_stays_in_ball(trained_model, data):
    x, y = data
    result = PGD(1.0, norm="l2", steps=10, step_size=0.25)(trained_model, x, y)
    norms = l2(result.x_adv - x)
    assert norms.max() <= 1.0 + 1e-5
    assert norms.max() > 0.5
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0


def test_per_channel_eps_bounds_each_channel(trained_model):
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.tensor([0.01, 0.05, 0.1]).view(3, 1, 1)
    model = torch.nn.Sequential(ChannelMean(), trained_model)
    y = torch.zeros(6, dtype=torch.long)
    result = PGD(eps, steps=3, step_size=eps / 2, final_iterate=True)(model, x, y)
    per_channel = (result.x_adv - x).abs().amax(dim=(0, 2, 3))
    assert torch.all(per_channel <= eps.flatten() + TOL)


def test_success_flags_match_the_model(trained_model, data):
    x, y = data
    for attack in (FGSM(0.15), PGD(0.15, steps=10, step_size=0.04)):
        result = attack(trained_model, x, y)
        with torch.no_grad():
            fooled = trained_model(result.x_adv).argmax(1) != y
        assert torch.equal(result.success, fooled)
        assert result.success.any() and not result.success.all()


def test_accuracy_falls_as_eps_grows(trained_model, data):
    x, y = data
    accs = [accuracy_under(PGD(e, steps=10, step_size=2.5 * e / 10), trained_model, x, y) for e in (0.02, 0.08, 0.2)]
    assert accs[0] > accs[1] > accs[2]
    assert accs[0] <= 1.0 and accs[2] < 0.2


def test_iterative_attacks_beat_fgsm(trained_model, data):
    x, y = data
    fgsm = accuracy_under(FGSM(0.1), trained_model, x, y)
    bim = accuracy_under(BIM(0.1, steps=10, step_size=0.01), trained_model, x, y)
    pgd = accuracy_under(PGD(0.1, steps=20, step_size=0.025), trained_model, x, y)
    assert bim < fgsm and pgd < fgsm


def test_any_iterate_is_at_least_as_strong_as_final_iterate(trained_model, data):
    x, y = data
    # Steps as large as eps make iterates oscillate, so some samples are fooled mid-way and then
    # recover; how many depends on the trained weights, so several step sizes are pooled.
    gained = 0
    for step_size in (0.08, 0.1, 0.2):
        kwargs = dict(steps=10, step_size=step_size)
        final = PGD(0.1, final_iterate=True, **kwargs)(trained_model, x, y).success
        anyit = PGD(0.1, final_iterate=False, **kwargs)(trained_model, x, y).success
        assert torch.all(anyit >= final), "a sample fooled at the last iterate is fooled at some iterate"
        gained += int(anyit.sum() - final.sum())
    assert gained > 0


def test_early_stop_saves_gradient_evaluations(trained_model, data):
    x, y = data
    anyit = PGD(0.2, steps=20, step_size=0.025)(trained_model, x, y)
    final = PGD(0.2, steps=20, step_size=0.025, final_iterate=True)(trained_model, x, y)
    assert final.gradient_evals == 20 * len(x)
    assert anyit.gradient_evals < final.gradient_evals / 2


def test_restarts_only_help(trained_model, data):
    x, y = data
    one = PGD(0.06, steps=5, step_size=0.02, restarts=1)(trained_model, x, y).success
    three = PGD(0.06, steps=5, step_size=0.02, restarts=3)(trained_model, x, y).success
    assert torch.all(three >= one)
    assert three.sum() > one.sum()


def test_results_do_not_depend_on_batch_composition(trained_model, data):
    x, y = data
    ids = torch.arange(len(x)) + 1000
    attack = PGD(0.08, steps=5, step_size=0.03)
    whole = attack(trained_model, x, y, ids)
    parts = [attack(trained_model, x[s:s + 17], y[s:s + 17], ids[s:s + 17]) for s in range(0, len(x), 17)]
    assert torch.equal(whole.success, torch.cat([p.success for p in parts]))
    assert torch.allclose(whole.x_adv, torch.cat([p.x_adv for p in parts]), atol=1e-6)


def test_seed_changes_random_start_and_same_seed_repeats(trained_model, data):
    x, y = data
    a = PGD(0.05, steps=1, step_size=0.01, seed=1, final_iterate=True)(trained_model, x, y).x_adv
    b = PGD(0.05, steps=1, step_size=0.01, seed=1, final_iterate=True)(trained_model, x, y).x_adv
    c = PGD(0.05, steps=1, step_size=0.01, seed=2, final_iterate=True)(trained_model, x, y).x_adv
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_is_untouched(trained_model, data):
    x, y = data
    before = torch.get_rng_state()
    PGD(0.05, steps=2, step_size=0.02)(trained_model, x, y)
    PGD(1.0, norm="l2", steps=2, step_size=0.5)(trained_model, x, y)
    assert torch.equal(before, torch.get_rng_state())


def test_random_start_is_uniform_in_the_ball():
    x = torch.full((400, 1, 8, 8), 0.5)
    start = PGD(0.1).init(x, torch.arange(400), restart=0) - x
    assert start.abs().max() <= 0.1 + TOL
    assert abs(start.mean().item()) < 0.002
    # Uniform on [-eps, eps] has standard deviation eps/sqrt(3).
    assert start.std().item() == pytest.approx(0.1 / 3 ** 0.5, rel=0.02)


def test_mifgsm_without_momentum_equals_bim(trained_model, data):
    x, y = data
    kwargs = dict(steps=5, step_size=0.02, final_iterate=True)
    mi = MIFGSM(0.1, decay=0.0, **kwargs)(trained_model, x, y)
    bim = BIM(0.1, **kwargs)(trained_model, x, y)
    # The L1 normalisation is a positive per-sample scale: the signs, hence the steps, are equal.
    assert torch.equal(mi.x_adv, bim.x_adv)


def test_attacks_do_not_leave_gradients_on_the_model(trained_model, data):
    x, y = data
    PGD(0.1, steps=2, step_size=0.05)(trained_model, x, y)
    assert all(p.grad is None for p in trained_model.parameters())


def test_registry_and_validation():
    assert ATTACKS.get("PGD") is PGD
    with pytest.raises(UsageError, match="did you mean 'pgd'"):
        ATTACKS.get("pgdd")
    with pytest.raises(UsageError, match="steps must be >= 1"):
        PGD(0.1, steps=0)
    with pytest.raises(UsageError, match="norm"):
        FGSM(0.1, norm="l1")
    with pytest.raises(UsageError, match="only defined for linf"):
        PGD(torch.ones(3, 1, 1) * 0.1, norm="l2")


def test_base_class_needs_a_step():
    with pytest.raises(NotImplementedError):
        Attack(0.1)(torch.nn.Flatten(), torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))
