"""Random few-pixel changes and the Pixel-index (Zhang & Cai, "Robustness Augmentation of
Deep Learning Model Based on Pixel Change"): the paper's figures, the perturbation's
properties on real digits, and the ``pixels`` attack against a trained model."""

from __future__ import annotations

from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from fractions import Fraction

import pytest
import torch

from robench.attacks.randomness import stream_key
from robench.attacks.pixels import PixelChange
from robench.attacks.registry import ATTACKS
from robench.errors import UsageError
from robench.pixels import change_pixels, pixel_index, pixel_index_terms, pixel_trials
from robench.pixels.perturb import value_range

IMAGE = 224 * 224
# Table 5: misclassified of 10,000 after 64 random pixels (full value range, whole image) -> printed Pi.
TABLE_5 = [(352, "27.58"), (416, "32.60"), (587, "46.00"), (798, "62.53"), (1395, "109.32")]
# Eq. 8-12: 1,000 of 10,000 wrong, 64 pixels, range 0..255, positions in the centred 200x200.
WORKED = {"misclassified": 1000, "area": 200 * 200, "printed": "98.30"}
PAPER_ROWS = [(m, 10_000, 64, IMAGE, 255, None, printed) for m, printed in TABLE_5] + [
    (WORKED["misclassified"], 10_000, 64, IMAGE, 255, WORKED["area"], WORKED["printed"])]


def exact_pi(mis, total, changed, image, value_range=255, area=None) -> Fraction:
    area = image if area is None else area
    return Fraction(mis, total) / (Fraction(changed, image) * Fraction(value_range, 255) * Fraction(area, image))


def paper_arithmetic(terms: dict[str, float], rounding: str) -> Decimal:
    """Pi as the paper computes it: p and a rounded to the printed 0.1276% and 79.72%, then two decimals.

    The rounded factors are derived from the function's own terms, so this checks
    that the function's inputs and factors are the paper's, up to its rounding.
    """
    w = Decimal(repr(terms["w"]))
    p = Decimal(repr(terms["p"])).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)  # 0.1276 %
    r = Decimal(repr(terms["r"])).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)
    a = Decimal(repr(terms["a"])).quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP)  # 79.72 %
    return (w / (p * r * a)).quantize(Decimal("0.01"), rounding=rounding)


# -- the Pixel-index ------------------------------------------------------------------

@pytest.mark.parametrize("row", PAPER_ROWS, ids=lambda row: f"{row[0]}-wrong-area-{row[5]}")
def test_pixel_index_is_exact(row):
    mis, total, changed, image, vr, area, _ = row
    expected = exact_pi(mis, total, changed, image, vr, area)
    assert pixel_index(mis, total, changed, image, vr, area) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize("row", PAPER_ROWS, ids=lambda row: f"{row[0]}-wrong-area-{row[5]}")
def test_paper_rounding_reproduces_the_printed_figures(row):
    """The paper divides by p = 0.1276% (exactly 0.12755...%) and a = 79.72% (79.719...%),
    then CUTS to two decimals. Truncation reproduces all six printed figures; rounding to
    nearest does not (27.59, 62.54, 109.33, 98.31 instead of 27.58, 62.53, 109.32, 98.30).
    The exact value is about 0.04% higher, which shows in the second decimal."""
    mis, total, changed, image, vr, area, printed = row
    terms = pixel_index_terms(mis, total, changed, image, vr, area)
    assert paper_arithmetic(terms, ROUND_DOWN) == Decimal(printed)
    exact = float(exact_pi(mis, total, changed, image, vr, area))
    assert exact != pytest.approx(float(printed), abs=0.005), "exact arithmetic differs in the second decimal"
    assert 0 < exact / float(printed) - 1 < 1e-3


def test_truncation_not_rounding_is_what_the_paper_did():
    rounded = [paper_arithmetic(pixel_index_terms(*row[:6]), ROUND_HALF_UP) for row in PAPER_ROWS]
    printed = [Decimal(row[-1]) for row in PAPER_ROWS]
    assert sum(r != p for r, p in zip(rounded, printed)) == 4  # 27.59, 62.54, 109.33, 98.31


def test_exact_values_in_the_second_decimal():
    assert round(pixel_index(416, 10_000, 64, IMAGE), 2) == 32.61  # printed 32.60
    assert round(pixel_index(1000, 10_000, 64, IMAGE, 255, 200 * 200), 2) == 98.34  # printed 98.30


def test_terms_match_the_definition():
    terms = pixel_index_terms(30, 120, 3, 100, value_range=51, area_pixels=25)
    assert set(terms) == {"w", "p", "r", "a", "pi"}
    assert terms["w"] == pytest.approx(0.25) and terms["p"] == pytest.approx(0.03)
    assert terms["r"] == pytest.approx(0.2) and terms["a"] == pytest.approx(0.25)
    assert terms["pi"] == pytest.approx(float(exact_pi(30, 120, 3, 100, 51, 25)), rel=1e-12)
    assert terms["pi"] == pixel_index(30, 120, 3, 100, value_range=51, area_pixels=25)
    # Boundaries that are valid: nothing misclassified, every pixel changed.
    assert pixel_index(0, 10, 4, 64) == 0.0
    assert pixel_index(10, 10, 64, 64, 255, 64) == 1.0


@pytest.mark.parametrize("args", [
    dict(misclassified=1, total=0, changed_pixels=4, image_pixels=64),
    dict(misclassified=-1, total=10, changed_pixels=4, image_pixels=64),
    dict(misclassified=11, total=10, changed_pixels=4, image_pixels=64),
    dict(misclassified=1, total=10, changed_pixels=0, image_pixels=64),
    dict(misclassified=1, total=10, changed_pixels=65, image_pixels=64),
    dict(misclassified=1, total=10, changed_pixels=20, image_pixels=64, area_pixels=16),
    dict(misclassified=1, total=10, changed_pixels=4, image_pixels=64, area_pixels=65),
    dict(misclassified=1, total=10, changed_pixels=4, image_pixels=64, value_range=0),
    dict(misclassified=1, total=10, changed_pixels=4, image_pixels=64, value_range=256),
])
def test_pixel_index_validation(args):
    with pytest.raises(UsageError):
        pixel_index(**args)


# -- the perturbation -----------------------------------------------------------------

def random_images(n: int, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    """8-bit colour images from an explicit generator (the global RNG is left alone)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=gen).float() / 255


def changed(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, H, W]: positions where any channel differs."""
    return (a != b).any(dim=1)


def levels(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x * 255)


@pytest.fixture(scope="module")
def digits(test_tensors):
    """Real 8-bit images: the digits test split, repeated under distinct sample ids for statistics."""
    x, _ = test_tensors
    return x.repeat(4, 1, 1, 1)


def test_n_distinct_positions_change_and_nothing_else(digits):
    n = 5
    out = change_pixels(digits, n, sample_ids=torch.arange(len(digits)), key=7)
    counts = changed(digits, out).flatten(1).sum(1).float()
    assert counts.max() <= n
    # One channel: a chosen pixel keeps its value with probability 1/256. Drawing positions
    # with replacement would lose ~C(5,2)/64 = 0.16 on average; never redrawing the old value, 0.
    assert counts.mean().item() == pytest.approx(n * (1 - 1 / 256), abs=0.012)
    grid = out * 255
    assert (grid - grid.round()).abs().max() < 1e-4, "output stays on the 8-bit grid"
    assert out.min() >= 0 and out.max() <= 1 and out.dtype == digits.dtype and out.shape == digits.shape


def test_new_values_are_uniform_over_0_255():
    x = torch.zeros(3000, 3, 8, 8)
    out = change_pixels(x, 3, sample_ids=torch.arange(3000), key=4)
    mask = changed(x, out).unsqueeze(1).expand_as(out)
    values = levels(out)[mask].long()
    assert values.numel() == pytest.approx(3000 * 3 * 3, abs=3)
    hist = torch.bincount(values, minlength=256).float()
    assert hist.numel() == 256 and hist.min() > 0, "0 and 255 are drawn too (about 105 times each)"
    expected = hist.sum() / 256
    chi2 = ((hist - expected) ** 2 / expected).sum().item()
    assert chi2 < 400, chi2  # 255 degrees of freedom: mean 255, sd 22.6


def test_positions_stay_in_the_centred_area_and_cover_it():
    x = random_images(400, h=12, w=16)
    out = change_pixels(x, 6, sample_ids=torch.arange(400), key=1, area=(4, 6))
    hit = changed(x, out)
    assert hit.flatten(1).sum(1).max() <= 6
    inside = torch.zeros(12, 16, dtype=torch.bool)
    inside[4:8, 5:11] = True  # (12-4)/2 = 4 rows above, (16-6)/2 = 5 columns left
    assert not (hit & ~inside).any()
    assert hit.any(dim=0)[inside].all(), "every position of the area is reachable"


def test_positions_are_uniform_in_the_area():
    x = torch.zeros(3000, 3, 10, 10)  # a chosen pixel stays black in all 3 channels with probability 256**-3
    out = change_pixels(x, 3, sample_ids=torch.arange(3000), key=5, area=(6, 6))
    hits = changed(x, out).sum(0).float()
    assert hits.sum() == pytest.approx(9000, abs=2)
    assert hits[2:8, 2:8].sum() == hits.sum()
    expected = hits.sum() / 36
    chi2 = ((hits[2:8, 2:8] - expected) ** 2 / expected).sum().item()
    assert chi2 < 80, chi2  # 35 degrees of freedom: mean 35, P(chi2 > 80) ~ 2e-5


def test_delta_bounds_the_change_and_draws_every_offset(digits):
    ids = torch.arange(len(digits))
    for d in (10, 127):
        out = change_pixels(digits, 8, sample_ids=ids, key=2, delta=d)
        step = levels(out) - levels(digits)
        assert step.abs().max() <= d
        assert step.max() == d and step.min() == -d, "both extreme offsets are drawn"
    assert torch.equal(change_pixels(digits, 8, sample_ids=ids, key=2, delta=0), digits)
    # On mid-grey images nothing clips: every offset in [-d, d] occurs, evenly.
    grey = torch.full((2000, 1, 8, 8), 128 / 255)
    step = levels(change_pixels(grey, 4, sample_ids=torch.arange(2000), key=3, delta=10)) - 128
    counts = torch.bincount((step[step != 0] + 10).long().flatten(), minlength=21).float()
    assert counts.numel() == 21 and counts[10] == 0
    expected = counts.sum() / 20
    chi2 = (((counts - expected) ** 2 / expected).sum() - expected).item()  # drop the empty zero bin
    assert chi2 < 60, chi2  # 19 degrees of freedom
    # Near the top the offsets clip at 255.
    bright = levels(change_pixels(torch.full((500, 1, 8, 8), 250 / 255), 4, sample_ids=torch.arange(500),
                                  key=3, delta=20))
    assert bright.max() == 255 and bright.min() >= 230


def test_value_range_for_the_index():
    assert value_range(None) == 255
    assert [value_range(d) for d in (10, 40, 70, 100, 127)] == [20, 80, 140, 200, 254]  # width of [-d, d]
    assert value_range(200) == 255


def test_all_channels_get_independent_values_first_changes_channel_0_only():
    x = random_images(300)
    ids = torch.arange(300)
    first = change_pixels(x, 8, sample_ids=ids, key=3, channels="first")
    assert torch.equal(first[:, 1:], x[:, 1:])
    count0 = (first[:, 0] != x[:, 0]).flatten(1).sum(1).float()
    assert count0.max() <= 8 and count0.mean().item() == pytest.approx(8 * 255 / 256, abs=0.05)

    every = change_pixels(x, 8, sample_ids=ids, key=3)
    mask = changed(x, every)
    per_channel = (every != x).permute(1, 0, 2, 3)[:, mask]  # [C, changed positions]
    assert per_channel.float().mean().item() > 0.98, "all channels of a chosen pixel change"
    new = levels(every).permute(1, 0, 2, 3)[:, mask]
    assert (new[0] == new[1]).float().mean() < 0.02, "each channel draws its own value"


def test_shared_positions_depend_only_on_the_key():
    x = torch.zeros(60, 3, 8, 8)
    a = change_pixels(x, 4, sample_ids=torch.arange(60), key=9, shared_positions=True)
    hit = changed(x, a)
    assert hit.any(dim=0).sum() == 4 and (hit == hit[0]).all(), "one list of 4 positions for every image"
    # Another split of the batch, other sample ids: the same positions.
    for part, ids in [(x[:7], torch.arange(7) + 1000), (x[7:], torch.arange(53) * 3 + 17)]:
        b = change_pixels(part, 4, sample_ids=ids, key=9, shared_positions=True)
        assert (changed(part, b) == hit[0]).all()
    # The values are still per sample.
    assert not torch.equal(a[0], a[1])
    other = change_pixels(x, 4, sample_ids=torch.arange(60), key=10, shared_positions=True)
    assert not torch.equal(changed(x, other)[0], hit[0])
    independent = changed(x, change_pixels(x, 4, sample_ids=torch.arange(60), key=9))
    assert independent.any(dim=0).sum() > 4, "by default every image draws its own positions"


def test_a_sample_gets_the_same_change_in_any_batch(digits):
    x = digits[:100]
    ids = torch.arange(100) + 5000
    whole = change_pixels(x, 6, sample_ids=ids, key=11, area=(6, 6), delta=60)
    singles = torch.cat([change_pixels(x[i:i + 1], 6, sample_ids=ids[i:i + 1], key=11, area=(6, 6), delta=60)
                         for i in range(100)])
    assert torch.equal(whole, singles)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    shuffled = change_pixels(x[perm], 6, sample_ids=ids[perm], key=11, area=(6, 6), delta=60)
    assert torch.equal(shuffled, whole[perm])
    assert torch.equal(change_pixels(x, 6, sample_ids=ids, key=11, area=(6, 6), delta=60), whole)
    other_key = change_pixels(x, 6, sample_ids=ids, key=12, area=(6, 6), delta=60)
    assert (other_key != whole).flatten(1).any(1).float().mean() > 0.9
    other_ids = change_pixels(x, 6, sample_ids=ids + 1, key=11, area=(6, 6), delta=60)
    assert (other_ids != whole).flatten(1).any(1).float().mean() > 0.9


def test_global_rng_untouched(trained_model, test_tensors):
    x, y = test_tensors[0][:20], test_tensors[1][:20]
    before = torch.get_rng_state()
    change_pixels(random_images(8), 3, sample_ids=torch.arange(8), key=1)
    change_pixels(random_images(8), 3, sample_ids=torch.arange(8), key=1, shared_positions=True, delta=5)
    pixel_trials(trained_model, x, y, torch.arange(20), n_pixels=2, trials=2, key=0)
    ATTACKS.get("pixels")(pixels=[2], trials=2)(trained_model, x, y, sample_ids=torch.arange(20))
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("kwargs", [
    dict(n_pixels=0), dict(n_pixels=65), dict(n_pixels=5, area=(2, 2)), dict(n_pixels=2, area=(9, 2)),
    dict(n_pixels=2, area=(0, 4)), dict(n_pixels=2, delta=-1), dict(n_pixels=2, delta=256),
    dict(n_pixels=2, channels="green"),
])
def test_change_pixels_validation(kwargs):
    x = random_images(2, h=8, w=8)
    with pytest.raises(UsageError):
        change_pixels(x, sample_ids=torch.arange(2), key=0, **kwargs)


# -- against the trained digits model -------------------------------------------------

@pytest.fixture(scope="module")
def digits_correct(trained_model, test_tensors):
    """Test digits the model gets right (the paper only changes correctly classified images)."""
    x, y = test_tensors
    with torch.no_grad():
        keep = trained_model(x).argmax(1) == y
    return x[keep], y[keep]


def fooling_rate(model, x, y, **change) -> float:
    """Mean over 6 independent trials: each draws fresh positions and values for every image."""
    return pixel_trials(model, x, y, torch.arange(len(x)), trials=6, key=321, **change).float().mean().item()


def test_more_pixels_fool_more_images(trained_model, digits_correct):
    x, y = digits_correct
    one, four, sixteen = (fooling_rate(trained_model, x, y, n_pixels=n) for n in (1, 4, 16))
    # Measured around 0.005, 0.025, 0.17 (527 images x 6 trials): the margins are wide.
    assert 0 < one < four < sixteen
    assert sixteen > 2 * four


def test_larger_changes_fool_more_images(trained_model, digits_correct):
    x, y = digits_correct
    rates = {d: fooling_rate(trained_model, x, y, n_pixels=16, delta=d) for d in (0, 10, 40, 127, None)}
    assert rates[0] == 0.0, "an unchanged image keeps its (correct) label"
    assert rates[10] <= rates[40] < rates[127] < rates[None]
    assert rates[127] > 2 * rates[10]


def test_pixel_trials_are_the_per_trial_changes(trained_model, digits_correct):
    x, y = digits_correct[0][:50], digits_correct[1][:50]
    ids = torch.arange(50) + 10
    fooled = pixel_trials(trained_model, x, y, ids, n_pixels=12, trials=3, key=8, area=(6, 6))
    assert fooled.shape == (3, 50) and fooled.dtype == torch.bool
    with torch.no_grad():
        for t in range(3):
            xt = change_pixels(x, 12, sample_ids=ids, key=stream_key(8, t), area=(6, 6))
            assert torch.equal(fooled[t], trained_model(xt).argmax(1) != y)


def test_pixels_attack_success_matches_the_model(trained_model, digits_correct):
    x, y = digits_correct
    ids = torch.arange(len(x))
    assert ATTACKS.get("pixels") is PixelChange
    attack = PixelChange(pixels=[12], trials=4, seed=3, stream=2)
    assert attack.norm == "l0" and attack.n_pixels == 12
    # The budget is the pixel count: an eps or an L-p norm is refused, not ignored.
    with pytest.raises(UsageError, match="takes no eps"):
        attack(trained_model, x, y, 0.3, ids)
    with pytest.raises(UsageError, match="supports norm l0"):
        PixelChange(pixels=[12], norm="linf")
    result = attack(trained_model, x, y, sample_ids=ids)
    with torch.no_grad():
        fooled_adv = trained_model(result.x_adv).argmax(1) != y
    assert torch.equal(result.success, fooled_adv)
    per_trial = pixel_trials(trained_model, x, y, ids, n_pixels=12, trials=4, key=stream_key(3, 2))
    assert torch.equal(result.success, per_trial.any(0)), "fooled by any trial"
    assert result.success.float().mean() > per_trial[0].float().mean()
    # Each x_adv is one trial's change, drawn with stream_key(seed, stream, trial).
    first = torch.where(per_trial.any(0), per_trial.float().argmax(0), torch.full_like(ids, 3))
    for t in range(4):
        pick = first == t
        expected = change_pixels(x[pick], 12, sample_ids=ids[pick], key=stream_key(3, 2, t))
        assert torch.equal(result.x_adv[pick], expected)
    assert changed(x, result.x_adv).flatten(1).sum(1).max() <= 12
    # One forward per trial and nothing more: every returned image is one a trial showed the model
    # (the check against the model above proves those verdicts are the base's score).
    assert result.gradient_evals == 0 and result.forward_evals == 4 * len(x)
    assert PixelChange.cost(attack.params).forward * len(x) == result.forward_evals
    described = attack.describe(None)
    assert described["pixels"] == 12 and described["trials"] == 4 and described["delta"] is None
