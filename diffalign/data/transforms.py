"""Image preparation for training: resize, crop, flip; records what SDXL's micro-conditioning needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from diffalign.data.pairs import PreferencePair


@dataclass
class PreparedImage:
    """``pixels``: ``[3, R, R]`` in [-1, 1]; ``original_size`` ``(h, w)`` before resizing;
    ``crop_top_left`` ``(top, left)`` in the resized image; ``flipped`` if mirrored."""

    pixels: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]
    flipped: bool = False


def _resize(img: Image.Image, resolution: int) -> Image.Image:
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    return img.resize(size, Image.Resampling.BICUBIC) if size != img.size else img


def prepare_image(img: Image.Image, resolution: int, *, center_crop: bool = True, random_flip: bool = False,
                  generator: torch.Generator | None = None, crop: tuple[int, int] | None = None,
                  flip: bool | None = None) -> PreparedImage:
    """Shortest side to ``resolution`` (bicubic), square crop (centre or random), optional flip.

    ``crop`` and ``flip`` force those choices (used to treat both images of a pair alike).
    """
    original = (img.height, img.width)
    img = _resize(img.convert("RGB"), resolution)
    if crop is None:
        if center_crop:
            crop = ((img.height - resolution) // 2, (img.width - resolution) // 2)
        else:
            crop = (int(torch.randint(0, img.height - resolution + 1, (), generator=generator)),
                    int(torch.randint(0, img.width - resolution + 1, (), generator=generator)))
    top, left = min(crop[0], img.height - resolution), min(crop[1], img.width - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip is None:
        flip = random_flip and bool(torch.rand((), generator=generator) < 0.5)
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
    return PreparedImage(arr, original, (top, left), flip)


def prepare_pair(pair: PreferencePair, resolution: int, *, center_crop: bool = True, random_flip: bool = False,
                 generator: torch.Generator | None = None) -> tuple[PreparedImage, PreparedImage]:
    """Prepare winner and loser; one flip decision for both (the pair stays comparable).

    Random crops are drawn once as a relative position and applied to both images."""
    flip = random_flip and bool(torch.rand((), generator=generator) < 0.5)
    if center_crop:
        return (prepare_image(pair.chosen, resolution, flip=flip), prepare_image(pair.rejected, resolution, flip=flip))
    u, v = torch.rand(2, generator=generator).tolist()
    out = []
    for img in (pair.chosen, pair.rejected):
        r = _resize(img.convert("RGB"), resolution)
        crop = (int(u * (r.height - resolution)), int(v * (r.width - resolution)))
        out.append(prepare_image(img, resolution, crop=crop, flip=flip))
    return out[0], out[1]
