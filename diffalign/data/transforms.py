"""Image preparation for training: resize, crop, flip; records what SDXL's micro-conditioning needs.

``original_size`` is the image's true ``(height, width)`` before any resizing, and
``crop_top_left`` is ``(top, left)`` of the square crop in the resized image, as SDXL's
``add_time_ids`` expect (the SDXL training recipe, not a hard-coded ``(0, 0)``). When the image is
mirrored the crop is given in the mirrored frame (``left`` measured from the new left edge), i.e. it
describes the image the model actually sees.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from diffalign.data.pairs import ImageLike, PreferencePair, as_pil, to_rgb


@dataclass
class Placement:
    """Where an image's training crop lies, decided from its size alone (no pixels touched):
    ``original_size`` ``(h, w)`` before resizing; ``crop_top_left`` ``(top, left)`` in the resized image
    (in the mirrored frame if ``flipped``)."""

    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    flipped: bool = False


@dataclass
class PreparedImage(Placement):
    """A :class:`Placement` with its ``pixels``: ``[3, R, R]`` in [-1, 1]."""

    pixels: torch.Tensor = field(kw_only=True)


def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """``(width, height)`` after scaling the shorter side to ``resolution``."""
    scale = resolution / min(width, height)
    return max(resolution, round(width * scale)), max(resolution, round(height * scale))


def resize_shortest(img: Image.Image, resolution: int) -> Image.Image:
    """Scale so the shorter side is ``resolution`` (bicubic)."""
    size = resized_size(img.width, img.height, resolution)
    return img.resize(size, Image.Resampling.BICUBIC) if size != img.size else img


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image to ``[3, H, W]`` float in [-1, 1] (transparency composited on white, :func:`to_rgb`)."""
    arr = np.array(to_rgb(img), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def place_image(width: int, height: int, resolution: int, *, center_crop: bool = True, random_flip: bool = False,
                generator: torch.Generator | None = None, crop: tuple[int, int] | None = None,
                flip: bool | None = None) -> Placement:
    """The square crop (centre or random) and flip of a ``width × height`` image once its shortest side
    is ``resolution``. ``crop`` (``(top, left)`` in the resized, unflipped image) and ``flip`` force
    those choices; they are how both images of a pair are treated alike."""
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    w, h = resized_size(width, height, resolution)
    max_top, max_left = h - resolution, w - resolution
    if crop is None:
        if center_crop:
            crop = (max_top // 2, max_left // 2)
        else:
            crop = (int(torch.randint(0, max_top + 1, (), generator=generator)),
                    int(torch.randint(0, max_left + 1, (), generator=generator)))
    top, left = min(max(crop[0], 0), max_top), min(max(crop[1], 0), max_left)
    if flip is None:
        flip = random_flip and bool(torch.rand((), generator=generator) < 0.5)
    if flip:
        left = max_left - left  # the same crop seen in the mirrored image
    return Placement((height, width), (top, left), bool(flip))


def render(img: ImageLike, placement: Placement, resolution: int) -> torch.Tensor:
    """The pixels ``[3, R, R]`` in [-1, 1] that ``placement`` describes (decoding an encoded image; an image
    with transparency composited on white, :func:`~diffalign.data.pairs.to_rgb`, before resizing)."""
    img = resize_shortest(to_rgb(as_pil(img)), resolution)
    top, left = placement.crop_top_left
    if placement.flipped:
        left = img.width - resolution - left  # back to the unmirrored frame
    img = img.crop((left, top, left + resolution, top + resolution))
    if placement.flipped:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(img)


def prepare_image(img: ImageLike, resolution: int, *, center_crop: bool = True, random_flip: bool = False,
                  generator: torch.Generator | None = None, crop: tuple[int, int] | None = None,
                  flip: bool | None = None) -> PreparedImage:
    """Shortest side to ``resolution`` (bicubic), square crop (centre or random), optional flip
    (:func:`place_image`, then :func:`render`)."""
    placement = place_image(img.width, img.height, resolution, center_crop=center_crop, random_flip=random_flip,
                            generator=generator, crop=crop, flip=flip)
    return PreparedImage(**vars(placement), pixels=render(img, placement, resolution))


def place_pair(pair: PreferencePair, resolution: int, *, center_crop: bool = True, random_flip: bool = False,
               generator: torch.Generator | None = None) -> tuple[Placement, Placement]:
    """Place winner and loser alike: one flip decision, one (relative) crop position for both.

    Each image keeps its own true original size; images of equal size get identical crops.
    """
    flip = random_flip and bool(torch.rand((), generator=generator) < 0.5)
    u, v = torch.rand(2, generator=generator).tolist() if not center_crop else (None, None)
    out = []
    for img in (pair.chosen, pair.rejected):
        w, h = resized_size(img.width, img.height, resolution)
        max_top, max_left = h - resolution, w - resolution
        if center_crop:
            crop = (max_top // 2, max_left // 2)
        else:
            crop = (min(int(u * (max_top + 1)), max_top), min(int(v * (max_left + 1)), max_left))
        out.append(place_image(img.width, img.height, resolution, crop=crop, flip=flip))
    return out[0], out[1]


def prepare_pair(pair: PreferencePair, resolution: int, *, center_crop: bool = True, random_flip: bool = False,
                 generator: torch.Generator | None = None) -> tuple[PreparedImage, PreparedImage]:
    """:func:`place_pair`, then :func:`render` both images."""
    placements = place_pair(pair, resolution, center_crop=center_crop, random_flip=random_flip, generator=generator)
    w, l = (PreparedImage(**vars(pl), pixels=render(img, pl, resolution))
            for img, pl in zip((pair.chosen, pair.rejected), placements))
    return w, l
