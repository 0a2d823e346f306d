"""Shared pieces of the Qwen-VL reward models (HPSv3 on Qwen2-VL, UnifiedReward on Qwen2.5-VL).

Image sizing follows ``qwen_vl_utils.fetch_image`` as the reference code calls it: each image is
resized (PIL bicubic on the uint8 image) to Qwen's "smart resize" of its size::

    h̄, w̄ = round(h / 28)·28, round(w / 28)·28                  (at least 28)
    if h̄·w̄ > max_pixels:  β = sqrt(h·w / max_pixels); h̄, w̄ = floor(h/β / 28)·28, floor(w/β / 28)·28
    if h̄·w̄ < min_pixels:  β = sqrt(min_pixels / (h·w)); h̄, w̄ = ceil(h·β / 28)·28, ceil(w·β / 28)·28

(factor 28 = patch 14 × spatial merge 2), then the model's image processor rescales, normalises and
cuts it into ``patch × patch`` patches (which :func:`patchify` reproduces on tensors for the
differentiable mode). Checkpoints written with transformers 4.x name the language model ``model.*``
and the vision tower ``visual.*``; transformers 5 nests both under ``model.language_model`` /
``model.visual`` (:func:`to_transformers5_keys`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_FACTOR = 28
MIN_PIXELS = 4 * 28 * 28          # qwen_vl_utils defaults
MAX_PIXELS = 16384 * 28 * 28
MAX_RATIO = 200


def smart_resize(height: int, width: int, factor: int = IMAGE_FACTOR, min_pixels: int = MIN_PIXELS,
                 max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """``(new_h, new_w)``: multiples of ``factor`` with ``min_pixels <= h·w <= max_pixels``, the aspect
    ratio kept as far as rounding allows (Qwen's formula, module docstring)."""
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise ValueError(f"image aspect ratio must be below {MAX_RATIO}, got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def resize_pil(images: Sequence[Image.Image], min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS,
               size: tuple[int, int] | None = None) -> list[Image.Image]:
    """RGB images resized (PIL bicubic) to their smart-resize size, or first to ``size = (w, h)`` when given
    (UnifiedReward's pairwise script resizes both images to 512×512 before Qwen's sizing)."""
    out = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != tuple(size):
            im = im.resize(tuple(size), Image.BICUBIC)
        h, w = smart_resize(im.height, im.width, min_pixels=min_pixels, max_pixels=max_pixels)
        out.append(im if (w, h) == im.size else im.resize((w, h), Image.BICUBIC))
    return out


def resize_tensor(x: torch.Tensor, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> torch.Tensor:
    """``[B, 3, H, W]`` in [0, 1] -> ``[B, 3, h̄, w̄]`` (smart-resize size; antialiased bicubic, not clamped)."""
    h, w = smart_resize(x.shape[-2], x.shape[-1], min_pixels=min_pixels, max_pixels=max_pixels)
    if (h, w) == tuple(x.shape[-2:]):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)


def patchify(x: torch.Tensor, mean: Sequence[float], std: Sequence[float], patch_size: int = 14,
             merge_size: int = 2, temporal_patch_size: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The Qwen2-VL image processor on tensors: ``x [B, 3, H, W]`` in [0, 1] (H, W multiples of
    ``patch·merge``) -> ``(pixel_values [B·gh·gw, 3·T·p·p], image_grid_thw [B, 3])``.

    Each image is normalised, repeated ``temporal_patch_size`` times along time, and its patches are
    ordered merge-window by merge-window (the order the processor uses, so the vision tower's merger
    sees the same 2×2 groups)."""
    b, c, h, w = x.shape
    unit = patch_size * merge_size
    if h % unit or w % unit:
        raise ValueError(f"image size {h}x{w} is not a multiple of {unit}; resize first (smart_resize)")
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    x = ((x - m) / s)[:, None].expand(b, temporal_patch_size, c, h, w)
    gh, gw = h // patch_size, w // patch_size
    x = x.reshape(b, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                  gw // merge_size, merge_size, patch_size)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = x.reshape(b * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=x.device)
    return pixel_values, grid


def to_transformers5_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Qwen2-VL / Qwen2.5-VL ``ForConditionalGeneration`` state dict in the transformers-5 layout:
    ``visual.*`` -> ``model.visual.*`` and ``model.*`` (not already nested) -> ``model.language_model.*``;
    other keys (``lm_head.*``, a reward head) unchanged."""
    out = {}
    for k, v in sd.items():
        if k.startswith("visual."):
            k = "model." + k
        elif re.match(r"^model\.(?!(language_model|visual)\.)", k):
            k = "model.language_model." + k[len("model."):]
        out[k] = v
    return out


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


def as_dtype(value: torch.dtype | str) -> torch.dtype:
    """A ``torch.dtype`` from itself or a name ("bf16", "bfloat16", "fp16", "fp32", "torch.bfloat16"), so a
    ``reward.yaml`` or a recipe's ``reward_options`` can load a 7B judge in bf16."""
    if isinstance(value, torch.dtype):
        return value
    key = str(value).removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"dtype must be a torch.dtype or one of {sorted(_DTYPES)}, got {value!r}")
    return _DTYPES[key]


def image_processor_stats(processor) -> tuple[list[float], list[float], int, int, int]:
    """``(mean, std, patch_size, merge_size, temporal_patch_size)`` of a Qwen-VL processor."""
    ip = processor.image_processor
    return (list(ip.image_mean), list(ip.image_std), int(ip.patch_size), int(ip.merge_size),
            int(ip.temporal_patch_size))
