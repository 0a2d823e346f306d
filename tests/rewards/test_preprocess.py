"""Preprocessing: the exact path equals the reference implementations, the differentiable path is close."""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from diffalign.rewards.preprocess import ImageTransform, from_hf_processor
from tests.rewards.conftest import pil_to_tensor, smooth_images

SIZES = [(37, 51), (50, 31), (64, 64), (99, 300)]


def noise(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("hw", SIZES)
def test_shortest_exact_matches_torchvision_and_hf(hw):
    import open_clip
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    im = noise(*hw)
    ours = ImageTransform("shortest", 32)([im])
    assert torch.equal(ours, open_clip.image_transform(32, is_train=False)(im)[None])
    hf = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    assert torch.allclose(from_hf_processor(hf)([im]), hf(images=[im], return_tensors="pt")["pixel_values"], atol=1e-6)


def test_crop_rounding_matters():
    # 47 rows cropped to 32: offset round(7.5) = 8 (torchvision) vs 15 // 2 = 7 (HF)
    im = noise(47, 32)
    tv = ImageTransform("shortest", 32, crop_rounding="torchvision")([im])
    hf = ImageTransform("shortest", 32, crop_rounding="hf")([im])
    assert torch.equal(tv[..., :-1, :], hf[..., 1:, :]) and not torch.equal(tv, hf)


@pytest.mark.parametrize("hw", [(40, 52), (30, 20), (32, 32)])
def test_longest_exact_matches_resize_max_size(hw):
    im = noise(*hw, seed=1)
    t = TF.to_tensor(im)
    h, w = t.shape[1:]
    scale = 32 / max(h, w)
    if scale != 1.0:
        nh, nw = round(h * scale), round(w * scale)
        t = TF.resize(t, [nh, nw], TF.InterpolationMode.BICUBIC, antialias=False)
        t = TF.pad(t, [(32 - nw) // 2, (32 - nh) // 2, 32 - nw - (32 - nw) // 2, 32 - nh - (32 - nh) // 2], fill=0)
    ref = TF.normalize(t, [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
    ours = ImageTransform("longest", 32)([im])[0]
    assert ours.shape == (3, 32, 32)
    assert torch.allclose(ours, ref, atol=1e-5)


@pytest.mark.parametrize("kind", ["shortest", "longest"])
def test_differentiable_close_to_exact_and_has_gradients(kind):
    """Tolerance: on smooth images the tensor path is within 0.03 (max) / 0.005 (mean) of the PIL
    path in normalised units (≈ 2/255 and 0.3/255 of a pixel value)."""
    images = smooth_images(2, (40, 52))
    tf = ImageTransform(kind, 32)
    exact = tf(images, "exact")
    x = pil_to_tensor(images).requires_grad_(True)
    diff = tf(x, "differentiable")
    assert diff.shape == exact.shape == (2, 3, 32, 32)
    assert (diff - exact).abs().max() < 0.03 and (diff - exact).abs().mean() < 0.005
    diff.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_tensor_input_to_exact_rounds_to_uint8():
    images = smooth_images(1)
    x = pil_to_tensor(images) + 0.3 / 255  # rounds back to the same uint8 image
    assert torch.equal(ImageTransform("shortest", 32)(x, "exact"), ImageTransform("shortest", 32)(images, "exact"))
