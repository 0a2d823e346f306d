"""Image preprocessing of the reward models, in an exact (PIL) and a differentiable (tensor) form.

Two pipelines cover every bundled reward:

``shortest``  CLIP style: resize the shortest side to ``size`` (bicubic; the long side becomes
              ``int(size * long / short)``), center-crop ``crop_size``, normalise. The exact form
              resizes the uint8 PIL image with ``Image.BICUBIC`` like torchvision's and HF's
              CLIPImageProcessor; the crop offset is ``round((H - crop) / 2)`` in torchvision
              (OpenAI CLIP, open_clip, LAION aesthetic, Hessel's CLIPScore) but
              ``(H - crop) // 2`` in HF (PickScore, torchmetrics) -- one pixel apart when the
              difference is odd, so it is a field (``crop_rounding``).
``longest``   HPSv2 (``ResizeMaxSize``): ToTensor, resize the longest side to ``size`` on the
              float tensor (new sides ``round(side * size / max(H, W))``), zero-pad to a square
              (left/top get ``pad // 2``), normalise. Nothing happens when the long side is
              already ``size``.

The differentiable form does the same arithmetic with ``torch.nn.functional.interpolate``
(bicubic, ``antialias=True``, which follows PIL's filter) on float tensors. It does not round to
uint8, so it differs from the exact form by at most a few 1/255 steps per pixel before
normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.rewards.base import Images, to_pil, to_tensor

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _short_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """``(new_h, new_w)`` with the shortest side ``size`` and the long side ``int(size * long / short)``."""
    if w <= h:
        return int(size * h / w), size
    return size, int(size * w / h)


def _crop_offset(length: int, crop: int, rounding: str) -> int:
    if rounding == "torchvision":
        return int(round((length - crop) / 2.0))
    if rounding == "hf":
        return (length - crop) // 2
    raise ValueError(f"crop_rounding must be 'torchvision' or 'hf', got {rounding!r}")


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


@dataclass(frozen=True)
class ImageTransform:
    """The preprocessing of one reward model; ``transform(images, mode) -> [B, 3, crop, crop]``.

    Attributes:
        kind: "shortest" (resize + center crop) or "longest" (resize + zero pad).
        size: target of the resized side (pixels).
        crop_size: output side (``shortest`` only; defaults to ``size``).
        mean, std: per-channel normalisation (applied to [0, 1] values).
        crop_rounding: "torchvision" or "hf" (see the module docstring).
        antialias: for ``longest``: antialias the tensor resize in both modes. HPSv2 ran on a
            torchvision whose tensor resize did not antialias (the default before 0.17), hence False.
    """

    kind: str = "shortest"
    size: int = 224
    crop_size: int | None = None
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    crop_rounding: str = "torchvision"
    antialias: bool = False

    def __post_init__(self):
        if self.kind not in ("shortest", "longest"):
            raise ValueError(f"kind must be 'shortest' or 'longest', got {self.kind!r}")

    @property
    def output_size(self) -> int:
        return (self.crop_size or self.size) if self.kind == "shortest" else self.size

    def __call__(self, images: Images, mode: str = "exact") -> torch.Tensor:
        if mode == "exact":
            return self.exact(images)
        if mode == "differentiable":
            return self.differentiable(to_tensor(images))
        raise ValueError(f"mode must be 'exact' or 'differentiable', got {mode!r}")

    # ------------------------------------------------------------------ exact
    def exact(self, images: Images) -> torch.Tensor:
        """The original pipeline on PIL images (tensors are first rounded to uint8 PIL images)."""
        pils = to_pil(images)
        if self.kind == "shortest":
            out = [self._shortest_pil(im) for im in pils]
        else:
            out = [_resize_longest_pad(to_tensor([im]), self.size, self.antialias) for im in pils]
        return _normalize(torch.cat(out), self.mean, self.std)

    def _shortest_pil(self, im: Image.Image) -> torch.Tensor:
        crop = self.crop_size or self.size
        nh, nw = _short_side_size(im.height, im.width, self.size)
        if (nh, nw) != (im.height, im.width):
            im = im.resize((nw, nh), resample=Image.BICUBIC)
        top, left = _crop_offset(nh, crop, self.crop_rounding), _crop_offset(nw, crop, self.crop_rounding)
        im = im.crop((left, top, left + crop, top + crop))
        return to_tensor([im])

    # ------------------------------------------------------------------ differentiable
    def differentiable(self, x: torch.Tensor) -> torch.Tensor:
        """The same steps on a float tensor ``[B, 3, H, W]`` in [0, 1]; gradients flow to ``x``."""
        if self.kind == "longest":
            return _normalize(_resize_longest_pad(x, self.size, self.antialias), self.mean, self.std)
        crop = self.crop_size or self.size
        h, w = x.shape[-2:]
        nh, nw = _short_side_size(h, w, self.size)
        if (nh, nw) != (h, w):
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = _crop_offset(nh, crop, self.crop_rounding), _crop_offset(nw, crop, self.crop_rounding)
        return _normalize(x[..., top:top + crop, left:left + crop], self.mean, self.std)


def _resize_longest_pad(x: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    """HPSv2's ``ResizeMaxSize`` on ``[B, 3, H, W]``: longest side to ``size`` (bicubic, no clamp), zero pad."""
    h, w = x.shape[-2:]
    scale = size / float(max(h, w))
    if scale == 1.0:
        return x
    nh, nw = round(h * scale), round(w * scale)
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=antialias)
    ph, pw = size - nh, size - nw
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)


def from_hf_processor(processor) -> ImageTransform:
    """The :class:`ImageTransform` of a transformers ``CLIPImageProcessor`` (PickScore's laion processor)."""
    size = processor.size
    short = size["shortest_edge"] if "shortest_edge" in size and size["shortest_edge"] else size["height"]
    crop = processor.crop_size["height"] if getattr(processor, "do_center_crop", True) else short
    if int(getattr(processor, "resample", 3)) != 3:
        raise ValueError(f"only bicubic image processors are supported (resample=3), got {processor.resample}")
    return ImageTransform("shortest", int(short), int(crop), tuple(processor.image_mean), tuple(processor.image_std),
                          crop_rounding="hf")
