"""DDPO's rule-based rewards: JPEG (in)compressibility, the file size in kB at quality 95."""

from __future__ import annotations

import io

import torch

from diffalign.rewards.base import Images, Mode, RewardModel, to_pil


def jpeg_size_kb(image, quality: int = 95) -> float:
    """Size in kB (1000 bytes) of ``image`` saved by PIL as JPEG at ``quality``."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.tell() / 1000.0


class JpegReward(RewardModel):
    """``sign · size_kB`` of the image as JPEG (quality 95), as in DDPO: ``sign=+1`` is
    ``jpeg-incompressibility``, ``sign=-1`` is ``jpeg-compressibility``. Float images are turned
    into uint8 with ``round(x · 255)``. Not differentiable; the prompt is ignored. Values depend on
    the libjpeg build inside Pillow, so pin Pillow to compare numbers across machines."""

    differentiable = False

    def __init__(self, sign: float = 1.0, quality: int = 95, mode: Mode = "exact", batch_size: int = 64):
        super().__init__(mode=mode, batch_size=batch_size)
        self.sign, self.quality = sign, quality
        self.name = "jpeg-incompressibility" if sign > 0 else "jpeg-compressibility"

    def _score(self, images: Images, prompts: list) -> torch.Tensor:
        return torch.tensor([self.sign * jpeg_size_kb(im, self.quality) for im in to_pil(images)])
