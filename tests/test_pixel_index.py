"""The Pixel-index against the paper's figures, and the few-pixel change's properties."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import robench
from robench.attacks import ATTACKS
from robench.errors import UsageError
from robench.pixels import change_pixels, pixel_trials
from robench.pixels.experiment import build_settings, run_pixel_experiments
from robench.pixels.perturb import value_range

IMAGE = 224 * 224
# Table 5 of the paper: misclassified of 10,000 at 64 pixels, full range and area -> printed Pi.
TABLE_5 = {"DenseNet": (352, 27.58), "ResNet": (416, 32.60), "AlexNet": (587, 46.00), "VGG": (798, 62.53),
           "SqueezeNet": (1395, 109.32)}


def cut2(value: float) -> float:
    return math.floor(value * 100) / 100


def exact(mis, total, changed, image, value_range=255, area=None) -> Fraction:
    area = image if area is None else area
    return (Fraction(mis, total) / (Fraction(changed, image) * Fraction(value_range, 255) * Fraction(area, image)))


@pytest.mark.parametrize("model", list(TABLE_5))
def test_table_5(model):
    mis, printed = TABLE_5[model]
    pi = robench.pixel_index(mis, 10_000, 64, IMAGE)
    assert pi == pytest.approx(float(exact(mis, 10_000, 64, IMAGE)), rel=1e-12)
    # The paper divides by p rounded to 0.1276% (64/50176 = 0.12755...%) and cuts the result
    # to two decimals; doing the same to the function's w reproduces every printed figure.
    w = mis / 10_000
    assert cut2(w / 0.001276) == printed
    # Exact arithmetic is higher by about 0.04% (the rounding of p), visible in the second decimal.
    assert pi > printed and pi - printed < 0.05


def test_table_5_exact_values_differ_in_the_second_decimal():
    assert round(robench.pixel_index(416, 10_000, 64, IMAGE), 2) == 32.61
    assert round(robench.pixel_index(352, 10_000, 64, IMAGE), 2) == 27.60


def test_worked_example():
    # 1,000 of 10,000 wrong, 64 pixels, range 255, positions in the centred 200x200 of 224x224.
    pi = robench.pixel_index(1000, 10_000, 64, IMAGE, value_range=255, area_pixels=200 * 200)
    assert pi == pytest.approx(float(exact(1000, 10_000, 64, IMAGE, 255, 200 * 200)), rel=1e-12)
    assert round(pi, 2) == 98.34
    # The paper: p = 0.1276%, a = 79.72% (both rounded) -> 98.30.
    assert cut2(0.10 / (0.001276 * 1.0 * 0.7972)) == 98.30


def test_terms_and_validation():
    terms = robench.pixels.pixel_index_terms(50, 200, 4, 64, value_range=20, area_pixels=16)
    assert terms == pytest.approx({"w": 0.25, "p": 4 / 64, "r": 20 / 255, "a": 16 / 64,
                                   "pi": 0.25 / ((4 / 64) * (20 / 255) * (16 / 64))})
    for args in [(1, 0, 4, 64), (5, 4, 4, 64), (1, 4, 0, 64), (1, 4, 65, 64), (1, 4, 4, 64, 0), (1, 4, 4, 64, 300),
                 (1, 4, 20, 64, 255, 16)]:
        with pytest.raises(UsageError):
            robench.pixel_index(*args)


def random_images(n=64, c=3, h=16, w=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=gen).float() / 255


def changed_positions(a, b):
    return (a != b).any(dim=1)  # [N, H, W]


def test_at_most_n_distinct_positions_change_and_nothing_else():
    x = random_images(400)
    out = change_pixels(x, 5, sample_ids=torch.arange(400), key=7)
    counts = changed_positions(x, out).flatten(1).sum(1)
    assert counts.max() <= 5
    # A new value equals the old one with probability 1/256 per channel.
    assert counts.float().mean().item() == pytest.approx(5 * (1 - 256.0 ** -3), abs=0.02)
    assert torch.equal(out * 255, torch.round(out * 255)), "8-bit grid"
    assert out.min() >= 0 and out.max() <= 1


def test_positions_stay_inside_the_centred_area():
    x = random_images(300, h=20, w=20)
    out = change_pixels(x, 6, sample_ids=torch.arange(300), key=1, area=(6, 10))
    hit = changed_positions(x, out).any(dim=0)
    rows, cols = torch.nonzero(hit, as_tuple=True)
    assert rows.min() >= 7 and rows.max() <= 12 and cols.min() >= 5 and cols.max() <= 14
    assert hit[7:13, 5:15].float().mean() > 0.9, "the whole area is reachable"


def test_delta_bounds_the_change():
    x = random_images(200)
    for d in (0, 3, 40):
        out = change_pixels(x, 16, sample_ids=torch.arange(200), key=2, delta=d)
        assert ((out - x) * 255).abs().round().max() <= d
    assert torch.equal(change_pixels(x, 16, sample_ids=torch.arange(200), key=2, delta=0), x)
    assert value_range(None) == 255 and value_range(10) == 20 and value_range(127) == 254


def test_first_channel_mode_leaves_other_channels():
    x = random_images(100)
    out = change_pixels(x, 8, sample_ids=torch.arange(100), key=3, channels="first")
    assert torch.equal(out[:, 1:], x[:, 1:])
    assert not torch.equal(out[:, 0], x[:, 0])


def test_shared_positions_are_one_list_for_every_image_and_batch():
    x = random_images(50)
    a = change_pixels(x, 4, sample_ids=torch.arange(50), key=9, shared_positions=True)
    b = change_pixels(x[10:], 4, sample_ids=torch.arange(10, 50) + 1000, key=9, shared_positions=True)
    pos_a = changed_positions(x, a)
    assert (pos_a | pos_a[0]).eq(pos_a[0]).all(), "no image changes a position outside the shared list"
    assert pos_a.any(dim=0).sum() <= 4
    assert (changed_positions(x[10:], b) & ~pos_a[0]).sum() == 0


def test_per_image_draws_do_not_depend_on_the_batch():
    x = random_images(64)
    ids = torch.arange(64) + 500
    whole = change_pixels(x, 6, sample_ids=ids, key=11)
    single = torch.cat([change_pixels(x[i:i + 1], 6, sample_ids=ids[i:i + 1], key=11) for i in range(64)])
    assert torch.equal(whole, single)
    other_key = change_pixels(x, 6, sample_ids=ids, key=12)
    assert not torch.equal(whole, other_key)


def test_global_rng_untouched():
    before = torch.get_rng_state()
    change_pixels(random_images(8), 3, sample_ids=torch.arange(8), key=1)
    assert torch.equal(before, torch.get_rng_state())


def test_positions_are_uniform():
    x = torch.zeros(4000, 3, 8, 8)  # a chosen pixel stays black in all 3 channels with probability 256**-3
    out = change_pixels(x, 2, sample_ids=torch.arange(4000), key=5)
    hits = changed_positions(x, out).flatten(1).sum(0).float()
    assert hits.sum() == pytest.approx(8000, abs=2)
    expected = hits.sum() / 64
    chi2 = ((hits - expected) ** 2 / expected).sum().item()
    assert chi2 < 120, chi2  # 63 degrees of freedom: mean 63, P(chi2 > 120) < 1e-4


def test_validation():
    x = random_images(2, h=4, w=4)
    ids = torch.arange(2)
    with pytest.raises(UsageError):
        change_pixels(x, 17, sample_ids=ids, key=0)
    with pytest.raises(UsageError):
        change_pixels(x, 2, sample_ids=ids, key=0, area=(5, 2))
    with pytest.raises(UsageError):
        change_pixels(x, 2, sample_ids=ids, key=0, delta=256)
    with pytest.raises(UsageError):
        change_pixels(x, 2, sample_ids=ids, key=0, channels="green")


@pytest.fixture(scope="module")
def digits_correct(trained_model, test_tensors):
    x, y = test_tensors
    with torch.no_grad():
        keep = trained_model(x).argmax(1) == y
    return x[keep], y[keep]


def mean_rate(model, x, y, trials=8, **change):
    fooled = pixel_trials(model, x, y, torch.arange(len(x)), trials=trials, key=123, **change)
    return fooled.float().mean().item()


def test_more_pixels_more_mistakes(trained_model, digits_correct):
    x, y = digits_correct
    rates = [mean_rate(trained_model, x, y, n_pixels=n) for n in (1, 4, 16)]
    assert rates[0] < rates[1] < rates[2]
    assert rates[2] > 0.1  # a quarter of an 8x8 digit changed


def test_larger_delta_more_mistakes(trained_model, digits_correct):
    x, y = digits_correct
    rates = [mean_rate(trained_model, x, y, n_pixels=16, delta=d) for d in (0, 40, 127)]
    assert rates[0] == 0.0
    assert rates[0] < rates[1] < rates[2]


def test_pixels_attack_in_a_suite(trained_model, test_tensors):
    suite = {"name": "px", "attacks": [{"attack": "pixels", "pixels": [2, 16], "trials": 3}]}
    doc = robench.evaluate(trained_model, test_tensors, suite, device="cpu").doc
    two, sixteen = doc["attacks"]
    assert two["params"]["pixels"] == 2 and two["eps"] is None and two["norm"] == "l0"
    assert two["accuracy"] > sixteen["accuracy"]
    assert sixteen["accuracy"] <= doc["clean"]["accuracy"]


def test_pixels_attack_success_matches_predictions(trained_model, digits_correct):
    x, y = digits_correct
    attack = ATTACKS.get("pixels")(n_pixels=8, trials=4, seed=3)
    result = attack(trained_model, x, y, torch.arange(len(x)))
    with torch.no_grad():
        fooled = trained_model(result.x_adv).argmax(1) != y
    assert torch.equal(result.success, fooled)
    assert changed_positions(x, result.x_adv).flatten(1).sum(1).max() <= 8


def test_pixel_suite_fields_are_validated():
    from robench.suites.loader import parse_suite

    with pytest.raises(UsageError, match="no eps budget"):
        parse_suite("name: a\nattacks:\n  - attack: pixels\n    eps: 0.1\n")
    with pytest.raises(UsageError, match="pixel counts"):
        parse_suite("name: a\nattacks:\n  - attack: pixels\n    pixels: [0]\n")
    with pytest.raises(UsageError, match="delta: pgd does not take"):
        parse_suite("name: a\nattacks:\n  - attack: pgd\n    eps: 0.1\n    delta: 3\n")
    spec = parse_suite("name: a\nattacks:\n  - attack: pixels\n    area: 4\n").suite.attacks[0]
    assert spec.area == [4, 4] and spec.pixel_counts() == [4, 8, 16, 32, 64]


def test_experiment_counts_match_direct_trials(trained_model, digits_split):
    from robench.models.wrapper import RobustModel

    _, x_te, _, y_te = digits_split
    images = torch.from_numpy(x_te).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(y_te)
    settings = build_settings([30], [(4, 4)])
    a = run_pixel_experiments(RobustModel(trained_model), images, labels, pixels=[2, 6], settings=settings,
                              trials=3, seed=1, batch_size=100)
    b = run_pixel_experiments(RobustModel(trained_model), images, labels, pixels=[2, 6], settings=settings,
                              trials=3, seed=1, batch_size=41)
    assert a.evaluated == b.evaluated and a.evaluated < len(labels)
    for key in a.counts:
        assert torch.equal(a.counts[key], b.counts[key]), "batching does not change the draws"
    # A setting's draws do not depend on which other settings run.
    c = run_pixel_experiments(RobustModel(trained_model), images, labels, pixels=[6],
                              settings=build_settings([], [(4, 4)]), trials=3, seed=1)
    assert torch.equal(c.counts[(1, 6)], a.counts[(2, 6)])
