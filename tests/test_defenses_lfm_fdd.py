"""Local Feature Masking, Feature-Density Dropout and inserting them into a model by module name."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

from robench.defenses.fdd import FeatureDensityDropout
from robench.defenses.insertion import defence_site, insert_after
from robench.defenses.lfm import LocalFeatureMasking
from robench.errors import UsageError


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are small: on a busy 2-core machine the intra-op thread hand-offs cost more
    than the work (a ResNet-18 forward went from 1 s to 25 ms), so run this module on one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------- Local Feature Masking

# 4000 samples of 64 maps of 16x16: enough for 3-sigma statistics, about 65 MB of mask.
N, C, H, W = 4000, 64, 16, 16
AREA, ASPECT = (0.03, 0.4), (0.3, 1 / 0.3)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def lfm_draw():
    """One masking of a large batch with the paper's defaults (p = 0.15, 32 of 64 channels)."""
    layer = LocalFeatureMasking(generator=seeded(0)).train()
    shape_only = torch.zeros(1).expand(N, C, H, W)  # masks() reads only the shape and device
    mask, values = layer.masks(shape_only)
    return mask, values


def rectangle_extents(mask: torch.Tensor):
    """Per (sample, channel): area, bounding-box height and width, and whether rows/cols are contiguous."""
    rows, cols = mask.any(dim=-1), mask.any(dim=-2)
    height, width = rows.sum(-1), cols.sum(-1)
    area = mask.sum((-2, -1))

    def contiguous(line: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        index = torch.arange(line.shape[-1])
        first = torch.where(line, index, line.shape[-1]).amin(-1)
        last = torch.where(line, index, -1).amax(-1)
        return (last - first + 1) == count

    solid = (area == height * width) & contiguous(rows, height) & contiguous(cols, width)
    return area, height, width, solid


def test_lfm_is_identity_in_eval_mode_and_with_p_zero():
    x = torch.randn(4, 8, 6, 6)
    assert LocalFeatureMasking(p=1.0).eval()(x) is x
    assert LocalFeatureMasking(p=0.0).train()(x) is x


@pytest.mark.parametrize(
    "kwargs",
    [
        {"p": -0.1},
        {"p": 1.5},
        {"channels": 0},
        {"area": (0.0, 0.4)},
        {"area": (0.5, 0.4)},
        {"area": (0.1, 1.2)},
        {"aspect": (0.0, 2.0)},
        {"aspect": (2.0, 1.0)},
    ],
)
def test_lfm_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        LocalFeatureMasking(**kwargs)


def test_lfm_masks_a_fraction_p_of_samples(lfm_draw):
    mask, _ = lfm_draw
    masked = mask.flatten(1).any(dim=1).double().mean().item()
    sigma = math.sqrt(0.15 * 0.85 / N)
    assert abs(masked - 0.15) < 3 * sigma


def test_lfm_touches_exactly_n_distinct_channels_per_masked_sample(lfm_draw):
    mask, _ = lfm_draw
    touched = mask.flatten(2).any(dim=2).sum(dim=1)
    assert set(touched.unique().tolist()) == {0, 32}
    # Over the masked samples every channel is picked about equally often (uniform choice).
    picks = mask.flatten(2).any(dim=2)[touched > 0].double().mean(dim=0)
    masked_count = int((touched > 0).sum())
    sigma = math.sqrt(0.5 * 0.5 / masked_count)
    assert (picks - 0.5).abs().max() < 4 * sigma  # 64 channels: 4 sigma for the maximum


def test_lfm_caps_the_channel_count_at_the_input_channels():
    layer = LocalFeatureMasking(p=1.0, channels=100, generator=seeded(1)).train()
    mask, _ = layer.masks(torch.zeros(50, 8, 10, 10))
    assert (mask.flatten(2).any(dim=2).sum(dim=1) == 8).all()


def test_lfm_region_is_one_rectangle_with_area_and_aspect_in_range_up_to_rounding(lfm_draw):
    mask, _ = lfm_draw
    area, height, width, solid = rectangle_extents(mask)
    chosen = area > 0
    assert solid[chosen].all()
    h, w = height[chosen].double(), width[chosen].double()
    # h = round(sqrt(S r)) and w = round(sqrt(S / r)): the unrounded a = sqrt(S r) lies in
    # [h - 1/2, h + 1/2] and b in [w - 1/2, w + 1/2]. A drawn (S, r) with S in [S_l, S_h] * H W
    # and r in [r_1, r_2] exists only if these intervals allow a*b and a/b in those ranges.
    s_lo, s_hi = AREA[0] * H * W, AREA[1] * H * W
    assert ((h - 0.5) * (w - 0.5) <= s_hi).all()
    assert ((h + 0.5) * (w + 0.5) >= s_lo).all()
    assert ((h - 0.5) / (w + 0.5) <= ASPECT[1]).all()
    assert ((h + 0.5) / (w - 0.5) >= ASPECT[0]).all()
    assert (h <= H).all() and (w <= W).all()
    # The sizes span the range rather than sitting at one value.
    fraction = (h * w) / (H * W)
    assert fraction.min() < 0.05 and fraction.max() > 0.35
    ratio = h / w
    assert ratio.min() < 0.45 and ratio.max() > 2.2


def test_lfm_rectangle_positions_cover_the_whole_map(lfm_draw):
    mask, _ = lfm_draw
    chosen = mask.flatten(2).any(dim=2)
    coverage = mask[chosen].double().mean(dim=0)  # how often each pixel is inside the rectangle
    assert (coverage > 0).all()
    # Uniform top-left positions favour the centre; the corners are still reached.
    assert coverage[H // 2, W // 2] > coverage[0, 0]


def test_lfm_forward_fills_one_value_per_channel_and_keeps_the_rest():
    x = torch.randn(300, 16, 12, 12)
    original = x.clone()
    layer = LocalFeatureMasking(p=0.5, channels=6, generator=seeded(2)).train()
    mask, values = layer.masks(x)
    layer.generator.manual_seed(2)  # the same draw again, now through forward
    out = layer(x)
    assert out is not x and torch.equal(x, original)  # out of place
    assert torch.equal(out[~mask], x[~mask])
    fill = torch.where(mask, out, torch.nan)
    per_channel = mask.flatten(2).any(dim=2)
    filled = fill.flatten(2)[per_channel]  # (masked channels, H*W) with NaN outside the rectangle
    lo, hi = filled.nan_to_num(2.0).amin(1), filled.nan_to_num(-1.0).amax(1)
    assert torch.equal(lo, hi)  # one value per rectangle
    assert torch.equal(lo, values[per_channel])
    assert (lo >= 0).all() and (lo < 1).all()
    # Values differ between the channels of one sample.
    for sample in per_channel.any(dim=1).nonzero().flatten()[:20]:
        assert values[sample][per_channel[sample]].unique().numel() == 6
    # Rand(0, 1): mean 1/2, variance 1/12.
    assert abs(lo.double().mean().item() - 0.5) < 3 * math.sqrt(1 / 12 / lo.numel())


def test_lfm_gradient_flows_to_unmasked_entries_only():
    x = torch.randn(64, 8, 10, 10, requires_grad=True)
    layer = LocalFeatureMasking(p=0.7, channels=4, generator=seeded(3)).train()
    mask, _ = layer.masks(x)
    layer.generator.manual_seed(3)
    layer(x).sum().backward()
    assert mask.any()
    assert torch.equal(x.grad, (~mask).float())


def test_lfm_clamps_when_no_rectangle_fits():
    # A 1x1 map with areas of at most 2 % of a pixel: every draw rounds to 0 rows, so the
    # fallback clamps the rectangle to the whole map.
    layer = LocalFeatureMasking(p=1.0, channels=3, area=(0.01, 0.02), generator=seeded(4)).train()
    mask, _ = layer.masks(torch.zeros(10, 5, 1, 1))
    assert (mask.flatten(1).sum(1) == 3).all()


# ---------------------------------------------------------------- Feature-Density Dropout

# 1-D points with 25 cells of width 1 between 1 and 26: cells 0, 8, 16 and 24 hold 8, 4, 2 and 1
# points (every value a half cell from a border, except the min and the max).
CELL_VALUES = [1.0] + [1.5] * 7 + [9.5] * 4 + [17.5] * 2 + [26.0]
CELL_P = [0.1] * 8 + [0.5] * 4 + [0.7] * 2 + [0.8]  # 0.9 - 0.8 * rho / 8


def fc_features(rows: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the 15 values, each row shuffled, scaled and shifted; with each entry's expected p."""
    generator = seeded(seed)
    base, p = torch.tensor(CELL_VALUES), torch.tensor(CELL_P)
    order = torch.rand(rows, base.numel(), generator=generator).argsort(dim=1)
    scale = 0.5 + torch.rand(rows, 1, generator=generator) * 3  # per-sample min/max: same cells
    return base[order] * scale + 2.0, p[order]


def test_fdd_drop_probability_falls_as_density_rises():
    x, expected = fc_features(50)
    p = FeatureDensityDropout(dims=1).drop_probabilities(x)
    torch.testing.assert_close(p, expected)


def test_fdd_accepts_pooled_maps_and_refuses_unpooled_ones_in_1d():
    x, expected = fc_features(5)
    p = FeatureDensityDropout(dims=1).drop_probabilities(x[..., None, None])
    torch.testing.assert_close(p, expected)
    with pytest.raises(ValueError, match="FDD-1D"):
        FeatureDensityDropout(dims=1).drop_probabilities(torch.ones(2, 3, 4, 4))


def test_fdd_constant_features_share_one_cell():
    p = FeatureDensityDropout(dims=1).drop_probabilities(torch.full((3, 10), 2.5))
    torch.testing.assert_close(p, torch.full((3, 10), 0.1))


def test_fdd_realised_dropout_matches_p_per_cell_and_keeps_the_mean():
    rows = 20000
    x, expected = fc_features(rows, seed=5)
    out = FeatureDensityDropout(dims=1, generator=seeded(6)).train()(x)
    dropped = out == 0
    for p in sorted(set(CELL_P)):
        in_cell = expected == p
        rate = dropped[in_cell].double().mean().item()
        assert abs(rate - p) < 3 * math.sqrt(p * (1 - p) / int(in_cell.sum()))
    # Survivors are scaled by exactly 1/(1-p) (inverted dropout) ...
    torch.testing.assert_close(out[~dropped], (x / (1 - expected))[~dropped])
    # ... so the output is unbiased: E[out / x] = 1, with variance p / (1 - p) per entry.
    ratio = (out / x).double()
    for p in sorted(set(CELL_P)):
        in_cell = expected == p
        sigma = math.sqrt(p / (1 - p) / int(in_cell.sum()))
        assert abs(ratio[in_cell].mean().item() - 1.0) < 3 * sigma


def test_fdd_with_kappa_zero_drops_at_the_constant_rate_alpha():
    x, _ = fc_features(4000, seed=7)
    layer = FeatureDensityDropout(dims=1, kappa=0.0, alpha=0.3, generator=seeded(8)).train()
    torch.testing.assert_close(layer.drop_probabilities(x), torch.full_like(x, 0.3))
    rate = (layer(x) == 0).double().mean().item()
    assert abs(rate - 0.3) < 3 * math.sqrt(0.3 * 0.7 / x.numel())


def test_fdd_is_identity_in_eval_mode():
    x = torch.randn(4, 32)
    assert FeatureDensityDropout(dims=1).eval()(x) is x
    maps = torch.randn(2, 16, 4, 4)
    assert FeatureDensityDropout(dims=2).eval()(maps) is maps


@pytest.mark.parametrize("kwargs", [{"dims": 0}, {"dims": 4}, {"grids": 0}, {"dims": 2, "grids": 1.5}])
def test_fdd_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        FeatureDensityDropout(**kwargs)


def orthonormal_patterns(count: int) -> torch.Tensor:
    """(count, 16) orthonormal 4x4 patterns: a checkerboard, left/right halves, top/bottom halves."""
    i, j = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    checker = (-1.0) ** (i + j)
    halves = torch.where(j < 2, 1.0, -1.0)
    top = torch.where(i < 2, 1.0, -1.0)
    return torch.stack([checker, halves, top])[:count].reshape(count, 16) / 4


# 2-D: channel = a * P1 + b * P2 with (a, b) symmetric under a -> -a, so a and b are uncorrelated
# and the principal axes are b (variance 7.46) then a (variance 5.7). With 5 cells per axis
# (a in [-5, 5], b in [0, 10], width 2) every point sits mid-cell or on the range's ends.
POINTS_2D = [(0, 5)] * 8 + [(0, 7)] * 4 + [(4, 9)] * 2 + [(-4, 9)] * 2 + [(5, 1), (-5, 1), (0, 0), (0, 10)]
P_2D = [0.1] * 8 + [0.5] * 4 + [0.7] * 4 + [0.8] * 4

# 3-D: (a, b, c) symmetric under a -> -a and under c -> -c: the axes are uncorrelated with
# variances b 7.65 > c 3.2 > a 0.8; 3 cells per axis (a in [-2, 2], b in [0, 9], c in [-4, 4]).
POINTS_3D = (
    [(0, 4.5, 0)] * 8
    + [(0, 7.5, 0)] * 4
    + [(2, 1.5, 0)] * 2
    + [(-2, 1.5, 0)] * 2
    + [(0, 0, 4), (0, 0, -4), (0, 9, 4), (0, 9, -4)]
)
P_3D = P_2D


def feature_maps(points: list, p: list, rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, C, 4, 4) maps built from the coefficient points (channels shuffled per row, scaled) and their p.

    Every map also gets the same constant offset: centring over the channels removes it, and it
    keeps every map non-zero so that a dropped map is recognisable.
    """
    generator = seeded(seed)
    coefficients = torch.tensor(points, dtype=torch.float32)
    maps = coefficients @ orthonormal_patterns(coefficients.shape[1])  # (C, 16)
    order = torch.rand(rows, len(points), generator=generator).argsort(dim=1)
    scale = 0.5 + torch.rand(rows, 1, 1, generator=generator) * 2
    offset = 1.0 + torch.rand(rows, 1, 1, generator=generator)
    return (maps[order] * scale + offset).reshape(rows, len(points), 4, 4), torch.tensor(p)[order]


@pytest.mark.parametrize("dims, points, p", [(2, POINTS_2D, P_2D), (3, POINTS_3D, P_3D)])
def test_fdd_on_feature_maps_follows_the_principal_components(dims, points, p):
    maps, expected = feature_maps(points, p, rows=40, seed=9)
    torch.testing.assert_close(FeatureDensityDropout(dims=dims).drop_probabilities(maps), expected)


@pytest.mark.parametrize("dims, points, p", [(2, POINTS_2D, P_2D), (3, POINTS_3D, P_3D)])
def test_fdd_drops_whole_feature_maps_at_the_rate_of_their_cell(dims, points, p):
    maps, expected = feature_maps(points, p, rows=3000, seed=10)
    original = maps.clone()
    out = FeatureDensityDropout(dims=dims, generator=seeded(11)).train()(maps)
    zero = (out == 0).flatten(2).all(dim=2)
    scaled = torch.isclose(out, maps / (1 - expected)[..., None, None]).flatten(2).all(dim=2)
    assert (zero ^ scaled).all()  # every map either dropped whole or scaled by exactly 1/(1-p)
    assert torch.equal(maps, original)
    for value in sorted(set(p)):
        in_cell = expected == value
        rate = zero[in_cell].double().mean().item()
        assert abs(rate - value) < 3 * math.sqrt(value * (1 - value) / int(in_cell.sum()))


# ---------------------------------------------------------------- inserting into a model


def small_resnet() -> nn.Module:
    torch.manual_seed(12)  # initialisation only
    return resnet18(num_classes=10)


def test_lfm_inside_resnet18_after_the_conv1_block():
    plain = small_resnet().eval()
    model = copy.deepcopy(plain)
    site = defence_site(model, "lfm")
    assert site == "relu"
    layer = LocalFeatureMasking(p=1.0, generator=seeded(13))
    handle = insert_after(model, site, layer)
    assert list(model.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(model.state_dict())  # strict: the checkpoint fits the plain architecture
    assert model.robench_defences == [("relu", layer, handle)]
    assert not any(module is layer for module in model.modules())

    x = torch.randn(2, 3, 32, 16)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        assert not layer.training  # follows the hooked module's eval mode

        # Train mode: the maps reaching max-pooling are conv1-resolution maps with 32 of 64 masked.
        seen = {}
        model.maxpool.register_forward_pre_hook(lambda module, inputs: seen.update(masked=inputs[0]))
        plain.relu.register_forward_hook(lambda module, inputs, output: seen.update(clean=output))
        model.train(), plain.train()
        model(x), plain(x)
    assert layer.training
    assert seen["masked"].shape == (2, 64, 16, 8)
    changed = (seen["masked"] != seen["clean"]).flatten(2).any(dim=2).sum(dim=1)
    # A rectangle whose fill equals every value it covers would go unseen; not with random floats.
    assert changed.tolist() == [32, 32]

    handle.remove()  # the stem's output passes untouched again
    with torch.no_grad():
        model(x), plain(x)
    assert torch.equal(seen["masked"], seen["clean"])


def test_fdd_inside_resnet18_on_maps_and_pooled_features():
    plain = small_resnet().eval()
    model = copy.deepcopy(plain)
    maps_site, fc_site = defence_site(model, "fdd-maps"), defence_site(model, "fdd-fc")
    assert (maps_site, fc_site) == ("layer4", "avgpool")
    on_maps = FeatureDensityDropout(dims=2, generator=seeded(14))
    on_fc = FeatureDensityDropout(dims=1, generator=seeded(15))
    insert_after(model, maps_site, on_maps)
    insert_after(model, fc_site, on_fc)
    assert list(model.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
        model.train(), plain.train()
        assert not torch.allclose(model(x), plain(x))
    assert on_maps.training and on_fc.training


def test_insert_after_runs_the_layer_once_inside_a_sequential():
    class AddOne(nn.Module):
        def forward(self, x):
            return x + 1

    model = nn.Sequential(nn.Identity(), nn.Identity())
    insert_after(model, "0", AddOne())
    assert torch.equal(model(torch.zeros(2)), torch.ones(2))
    assert len(list(model.children())) == 2
    # The hook is a plain object, so the defended model copies (and pickles) with its defence.
    assert torch.equal(copy.deepcopy(model)(torch.zeros(2)), torch.ones(2))


def test_insert_after_unknown_module_suggests_a_name():
    with pytest.raises(UsageError, match="did you mean 'layer4'"):
        insert_after(small_resnet(), "layer_4", LocalFeatureMasking())


def test_defence_site_needs_a_known_model_and_kind():
    with pytest.raises(UsageError, match="name the module"):
        defence_site(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), "lfm")
    with pytest.raises(UsageError, match="did you mean 'lfm'"):
        defence_site(small_resnet(), "lfn")
