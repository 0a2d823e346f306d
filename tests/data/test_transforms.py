import torch
from PIL import Image

from diffalign.data import PreferencePair, prepare_image, prepare_pair


def _halves(size=(60, 30)) -> Image.Image:
    """Left half black, right half white (width, height)."""
    img = Image.new("RGB", size, (0, 0, 0))
    img.paste((255, 255, 255), (size[0] // 2, 0, size[0], size[1]))
    return img


def test_original_size_and_centre_crop():
    out = prepare_image(_halves((60, 30)), 16)
    assert out.pixels.shape == (3, 16, 16) and out.original_size == (30, 60)
    assert out.crop_top_left == (0, 8)  # resized to 32x16, centre crop starts at left 8
    assert out.pixels.min() >= -1 and out.pixels.max() <= 1
    tall = prepare_image(Image.new("RGB", (20, 50)), 10)
    assert tall.original_size == (50, 20) and tall.crop_top_left == (7, 0)  # resized 10x25


def test_pair_flips_together_and_keeps_each_true_size():
    pair = PreferencePair("p", _halves((60, 30)), _halves((40, 40)))
    flips = set()
    for seed in range(12):
        w, l = prepare_pair(pair, 16, random_flip=True, generator=torch.Generator().manual_seed(seed))
        assert w.flipped == l.flipped
        flips.add(w.flipped)
        for im in (w, l):  # the white half moved to the left exactly when flipped
            left_bright = im.pixels[:, :, :4].mean() > 0
            assert bool(left_bright) == im.flipped
        assert (w.original_size, l.original_size) == ((30, 60), (40, 40))
    assert flips == {True, False}


def test_random_crop_same_relative_position_recorded():
    pair = PreferencePair("p", Image.new("RGB", (80, 20)), Image.new("RGB", (80, 20)))
    crops = set()
    for seed in range(10):
        w, l = prepare_pair(pair, 20, center_crop=False, generator=torch.Generator().manual_seed(seed))
        assert w.crop_top_left == l.crop_top_left and 0 <= w.crop_top_left[1] <= 60 and w.crop_top_left[0] == 0
        crops.add(w.crop_top_left)
    assert len(crops) > 3
    # a flipped crop is given in the mirrored frame: the left offset is measured from the new left edge
    img = Image.new("RGB", (80, 20))
    assert prepare_image(img, 20, crop=(0, 10), flip=True).crop_top_left == (0, 50)


def test_crop_content_matches_coordinates():
    # a gradient image: pixel column x has red value x, so the crop's first column tells its left offset
    img = Image.new("RGB", (100, 20))
    img.putdata([(x, 0, 0) for _ in range(20) for x in range(100)])
    out = prepare_image(img, 20, crop=(0, 37))
    assert abs((out.pixels[0, :, 0].mean().item() + 1) * 127.5 - 37) < 1.5


def test_flipped_crop_content_is_the_mirrored_crop():
    img = Image.new("RGB", (80, 20))
    img.putdata([(x, 0, 0) for _ in range(20) for x in range(80)])
    out = prepare_image(img, 20, crop=(0, 10), flip=True)  # columns 10..29, mirrored
    red = (out.pixels[0, 0] + 1) * 127.5
    assert abs(red[0].item() - 29) < 1 and abs(red[-1].item() - 10) < 1
    assert out.crop_top_left == (0, 50)  # the same crop seen from the mirrored image's left edge
