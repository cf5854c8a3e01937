"""Input-level defences: few-pixel augmentation (pixel paper, Algorithm 1) and Cutout."""

from __future__ import annotations

import torch

from robench.defenses.few_pixel import Cutout, FewPixelAugment


def _images(n=400, c=3, h=16, w=16):
    # On the 8-bit grid, so only the changed pixels can differ after the augmentation's rounding.
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(0)).float() / 255


def test_few_pixel_changes_exactly_the_requested_number_of_pixels():
    x = _images()
    for pixels in (1, 4, 13):
        out = FewPixelAugment(pixels, p=1.0)(x, torch.arange(len(x)), key=7)
        changed_positions = (out != x).any(dim=1).flatten(1).sum(dim=1)
        # A redrawn value may equal the old one (1/256 per channel, all three: ~6e-8): at most `pixels`.
        assert int(changed_positions.max()) == pixels
        assert float((changed_positions == pixels).float().mean()) > 0.95
        assert out.min() >= 0 and out.max() <= 1


def test_few_pixel_share_of_changed_images_and_determinism():
    x = _images(n=4000, c=1, h=8, w=8)
    ids = torch.arange(len(x))
    aug = FewPixelAugment(3, p=0.3)
    out = aug(x, ids, key=1)
    share = float((out != x).flatten(1).any(dim=1).float().mean())
    assert abs(share - 0.3) < 3 * (0.3 * 0.7 / len(x)) ** 0.5 + 0.01
    # Counter-based: the same images and key give the same change whatever the batch order.
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    assert torch.equal(aug(x[perm], ids[perm], key=1), out[perm])
    assert not torch.equal(aug(x, ids, key=2), out)


def test_first_channel_mode_leaves_the_other_channels():
    x = _images(n=50)
    out = FewPixelAugment(5, p=1.0, channels="first")(x, torch.arange(50), key=3)
    assert torch.equal(out[:, 1:], x[:, 1:]) and not torch.equal(out[:, 0], x[:, 0])


def test_cutout_zeroes_one_square_cut_at_the_border():
    x = torch.rand(2000, 3, 12, 12) + 0.1  # no zeros of its own
    out = Cutout(size=4)(x, torch.arange(len(x)), key=5)
    zero = (out == 0).all(dim=1)
    assert torch.equal(zero.unsqueeze(1).expand_as(x), out == 0)  # all channels of a pixel, together
    rows, cols = zero.any(dim=2), zero.any(dim=1)
    area = zero.flatten(1).sum(dim=1)
    assert torch.equal(area, rows.sum(dim=1) * cols.sum(dim=1))  # one axis-aligned rectangle
    assert int(area.max()) == 16 and int(area.min()) >= 4  # whole inside, or cut at a corner (2x2 at least)
    assert torch.equal(out[~zero.unsqueeze(1).expand_as(x)], x[~zero.unsqueeze(1).expand_as(x)])
    never = Cutout(size=4, p=0.0)(x, torch.arange(len(x)), key=5)
    assert torch.equal(never, x)


def test_crop_flip_gives_a_window_of_the_padded_image_flipped_half_of_the_time():
    from robench.training.augment import CropFlip

    x = torch.rand(600, 2, 6, 6)
    out = CropFlip(crop_padding=2, flip=True)(x, torch.arange(len(x)), key=11)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    windows = [padded[:, :, i:i + 6, j:j + 6] for i in range(5) for j in range(5)]
    plain = torch.stack([(w == out).flatten(1).all(1) for w in windows]).any(0)
    flipped = torch.stack([(w.flip(3) == out).flatten(1).all(1) for w in windows]).any(0)
    assert bool((plain | flipped).all())
    assert abs(float(flipped.float().mean()) - 0.5) < 0.08
