"""Native attacks on a model trained during the test run on scikit-learn digits."""

from __future__ import annotations

import pytest
import torch

from robench.attacks import ATTACKS, BIM, FGSM, MIFGSM, PGD
from robench.attacks.base import Attack
from robench.attacks.gradient import GradientAttack
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


def accuracy_under(attack, model, x, y, eps):
    return 1.0 - attack(model, x, y, eps).success.float().mean().item()


@pytest.mark.parametrize(
    "attack",
    [
        FGSM(),
        BIM(steps=5, step_size=0.03),
        PGD(steps=5, step_size=0.03),
        PGD(steps=5, step_size=0.03, final_iterate=True),
        MIFGSM(steps=5, step_size=0.02),
    ],
    ids=["fgsm", "bim", "pgd", "pgd-final", "mifgsm"],
)
def test_linf_results_stay_in_ball_and_image_range(attack, trained_model, data):
    x, y = data
    result = attack(trained_model, x, y, 0.1)
    assert result.x_adv.shape == x.shape
    assert linf(result.x_adv - x).max() <= 0.1 + TOL
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0
    # The attacks must actually move the images (a no-op would pass the bounds).
    assert linf(result.x_adv - x).max() > 0.05


def test_l2_pgd_stays_in_ball(trained_model, data):
    x, y = data
    result = PGD(norm="l2", steps=10, step_size=0.25)(trained_model, x, y, 1.0)
    norms = l2(result.x_adv - x)
    assert norms.max() <= 1.0 + 1e-5
    assert norms.max() > 0.5
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0


def test_per_channel_eps_bounds_each_channel(trained_model):
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # eps 0.05 in normalised units with these channel scales is 0.01, 0.05 and 0.1 in pixels.
    scale = torch.tensor([0.2, 1.0, 2.0]).view(3, 1, 1)
    eps = 0.05 * scale
    model = torch.nn.Sequential(ChannelMean(), trained_model)
    y = torch.zeros(6, dtype=torch.long)
    result = PGD(steps=3, step_size="eps/2", final_iterate=True, eps_scale=scale)(model, x, y, 0.05)
    per_channel = (result.x_adv - x).abs().amax(dim=(0, 2, 3))
    assert torch.all(per_channel <= eps.flatten() + TOL)


def test_success_flags_match_the_model(trained_model, data):
    x, y = data
    for attack in (FGSM(), PGD(steps=10, step_size=0.04)):
        result = attack(trained_model, x, y, 0.15)
        with torch.no_grad():
            fooled = trained_model(result.x_adv).argmax(1) != y
        assert torch.equal(result.success, fooled)
        assert result.success.any() and not result.success.all()


def test_accuracy_falls_as_eps_grows(trained_model, data):
    x, y = data
    pgd = PGD(steps=10, step_size="2.5*eps/steps")  # one attack object for the whole sweep
    accs = [accuracy_under(pgd, trained_model, x, y, e) for e in (0.02, 0.08, 0.2)]
    assert accs[0] > accs[1] > accs[2]
    assert accs[0] <= 1.0 and accs[2] < 0.2


def test_iterative_attacks_beat_fgsm(trained_model, data):
    x, y = data
    fgsm = accuracy_under(FGSM(), trained_model, x, y, 0.1)
    bim = accuracy_under(BIM(steps=10, step_size=0.01), trained_model, x, y, 0.1)
    pgd = accuracy_under(PGD(steps=20, step_size=0.025), trained_model, x, y, 0.1)
    assert bim < fgsm and pgd < fgsm


def test_any_iterate_is_at_least_as_strong_as_final_iterate(trained_model, data):
    x, y = data
    # Steps as large as eps make iterates oscillate, so some samples are fooled mid-way and then
    # recover; how many depends on the trained weights, so several step sizes are pooled.
    gained = 0
    for step_size in (0.08, 0.1, 0.2):
        kwargs = dict(steps=10, step_size=step_size)
        final = PGD(final_iterate=True, **kwargs)(trained_model, x, y, 0.1).success
        anyit = PGD(final_iterate=False, **kwargs)(trained_model, x, y, 0.1).success
        assert torch.all(anyit >= final), "a sample fooled at the last iterate is fooled at some iterate"
        gained += int(anyit.sum() - final.sum())
    assert gained > 0


def test_early_stop_saves_gradient_evaluations(trained_model, data):
    x, y = data
    anyit = PGD(steps=20, step_size=0.025)(trained_model, x, y, 0.2)
    final = PGD(steps=20, step_size=0.025, final_iterate=True)(trained_model, x, y, 0.2)
    assert final.gradient_evals == 20 * len(x)
    assert anyit.gradient_evals < final.gradient_evals / 2
    # One restart, so the only forward-only passes are the base's scoring of the examples the loop did
    # not score: every last iterate (final-iterate); with any-iterate, only the samples the loop saw
    # no iterate fooling (the fooling iterate was scored by the gradient pass that found it).
    assert final.forward_evals == len(x)
    assert int((~anyit.success).sum()) <= anyit.forward_evals < len(x) / 2
    with torch.no_grad():
        assert torch.equal(anyit.success, trained_model(anyit.x_adv).argmax(1) != y)


def test_restarts_only_help(trained_model, data):
    x, y = data
    one = PGD(steps=5, step_size=0.02, restarts=1)(trained_model, x, y, 0.06).success
    three = PGD(steps=5, step_size=0.02, restarts=3)(trained_model, x, y, 0.06).success
    assert torch.all(three >= one)
    assert three.sum() > one.sum()


def test_results_do_not_depend_on_batch_composition(trained_model, data):
    x, y = data
    ids = torch.arange(len(x)) + 1000
    attack = PGD(steps=5, step_size=0.03)
    whole = attack(trained_model, x, y, 0.08, ids)
    parts = [attack(trained_model, x[s:s + 17], y[s:s + 17], 0.08, ids[s:s + 17]) for s in range(0, len(x), 17)]
    assert torch.equal(whole.success, torch.cat([p.success for p in parts]))
    assert torch.allclose(whole.x_adv, torch.cat([p.x_adv for p in parts]), atol=1e-6)
    # Batches of 17 inside one call, with slots refilled as samples finish or not.
    for refill in (True, False):
        batched = attack(trained_model, x, y, 0.08, ids, batch_size=17, refill=refill)
        assert torch.equal(whole.success, batched.success)
        assert torch.allclose(whole.x_adv, batched.x_adv, atol=1e-6)


def test_seed_changes_random_start_and_same_seed_repeats(trained_model, data):
    x, y = data
    a = PGD(steps=1, step_size=0.01, seed=1, final_iterate=True)(trained_model, x, y, 0.05).x_adv
    b = PGD(steps=1, step_size=0.01, seed=1, final_iterate=True)(trained_model, x, y, 0.05).x_adv
    c = PGD(steps=1, step_size=0.01, seed=2, final_iterate=True)(trained_model, x, y, 0.05).x_adv
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_is_untouched(trained_model, data):
    x, y = data
    before = torch.get_rng_state()
    PGD(steps=2, step_size=0.02)(trained_model, x, y, 0.05)
    PGD(norm="l2", steps=2, step_size=0.5)(trained_model, x, y, 1.0)
    assert torch.equal(before, torch.get_rng_state())


def test_random_start_is_uniform_in_the_ball():
    x = torch.full((400, 1, 8, 8), 0.5)
    start = PGD().init(x, 0.1, torch.arange(400), restart=0) - x
    assert start.abs().max() <= 0.1 + TOL
    assert abs(start.mean().item()) < 0.002
    # Uniform on [-eps, eps] has standard deviation eps/sqrt(3).
    assert start.std().item() == pytest.approx(0.1 / 3 ** 0.5, rel=0.02)


def test_mifgsm_without_momentum_equals_bim(trained_model, data):
    x, y = data
    kwargs = dict(steps=5, step_size=0.02, final_iterate=True)
    mi = MIFGSM(decay=0.0, **kwargs)(trained_model, x, y, 0.1)
    bim = BIM(**kwargs)(trained_model, x, y, 0.1)
    # The L1 normalisation is a positive per-sample scale: the signs, hence the steps, are equal.
    assert torch.equal(mi.x_adv, bim.x_adv)


def test_attacks_do_not_leave_gradients_on_the_model(trained_model, data):
    x, y = data
    PGD(steps=2, step_size=0.05)(trained_model, x, y, 0.1)
    assert all(p.grad is None for p in trained_model.parameters())


def test_registry_and_validation():
    assert ATTACKS.get("PGD") is PGD
    with pytest.raises(UsageError, match="did you mean 'pgd'"):
        ATTACKS.get("pgdd")
    with pytest.raises(UsageError, match="steps: Input should be greater than or equal to 1"):
        PGD(steps=0)
    with pytest.raises(UsageError, match="norm"):
        FGSM(norm="l1")
    with pytest.raises(UsageError, match="only defined for linf"):
        PGD(norm="l2", eps_scale=torch.ones(3, 1, 1) * 0.1)
    with pytest.raises(UsageError, match="fgsm: steps: Extra inputs are not permitted"):
        FGSM(steps=5)
    args = (torch.nn.Flatten(), torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(UsageError, match="eps is a number"):
        PGD()(*args, torch.ones(1, 1, 1) * 0.1)
    with pytest.raises(UsageError, match="eps must be >= 0"):
        PGD()(*args, -0.1)
    with pytest.raises(UsageError, match="needs an eps"):
        PGD()(*args)


def test_step_size_is_an_expression_evaluated_at_the_call_eps():
    assert PGD(steps=4, step_size=0.03).params.step_size == "0.03"
    assert PGD.step_size_at(PGD(steps=4).params, 0.1) == 2.5 * 0.1 / 4
    assert BIM.step_size_at(BIM(steps=4).params, 0.1) == 0.1 / 4
    assert FGSM.step_size_at(FGSM().params, 0.1) == 0.1
    assert PGD.step_size_at(PGD(steps=5, step_size="eps/2").params, 0.2) == 0.1


def test_base_class_needs_a_step():
    args = (torch.nn.Flatten(), torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), 0.1)
    with pytest.raises(NotImplementedError):
        Attack()(*args)
    with pytest.raises(NotImplementedError):
        GradientAttack()(*args)


def test_every_builtin_attack_is_exported_and_batched_only_through_its_context():
    import inspect

    import robench.attacks
    from robench.attacks.registry import BUILTIN_ATTACKS

    for name in BUILTIN_ATTACKS:
        cls = ATTACKS.get(name)
        assert getattr(robench.attacks, cls.__name__) is cls and cls.__name__ in robench.attacks.__all__
        assert list(inspect.signature(cls.run).parameters) == ["self", "model", "x", "y", "eps", "context"], name


class RowCounter(torch.nn.Module):
    """Records the rows of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.rows = model, []

    def forward(self, x):
        self.rows.append(len(x))
        return self.model(x)


@pytest.mark.parametrize("attack", [PGD(steps=5, restarts=2), BIM(steps=3)])
@pytest.mark.parametrize("refill", [True, False])
def test_the_driver_never_sends_more_than_the_batch_size(trained_model, data, attack, refill):
    x, y = data[0][:30], data[1][:30]
    model = RowCounter(trained_model)
    result = attack(model, x, y, 0.1, batch_size=7, refill=refill)
    assert max(model.rows) <= 7 and result.success.any()
