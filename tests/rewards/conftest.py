"""Tiny random-weight models of the real reward architectures, built and saved locally."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

LAYOUTS = Path(__file__).resolve().parents[3] / "shared" / "reference" / "checkpoint_layouts"
SHARED_WEIGHTS = Path(__file__).resolve().parents[3] / "shared" / "weights"
TINY_OPEN_CLIP = "diffalign-tiny-vit"          # mirrors ViT-H-14's structure (GELU)
TINY_OPEN_CLIP_QUICKGELU = "diffalign-tiny-vit-quickgelu"  # mirrors ViT-L-14-quickgelu, embed_dim 768


def smooth_images(n: int = 3, size: tuple[int, int] = (40, 52), seed: int = 0) -> list[Image.Image]:
    """Smooth random images (low-frequency colour fields): realistic for resize comparisons."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 5, 6, generator=g)
    x = torch.nn.functional.interpolate(low, size=size, mode="bilinear", align_corners=False)
    arr = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def pil_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])).permute(0, 3, 1, 2)


@pytest.fixture(scope="session")
def tiny_hf_clip(tmp_path_factory) -> Path:
    """A saved tiny ``CLIPModel`` + ``CLIPProcessor`` (32 px, OpenAI mean/std, bicubic, word tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffalign.shapes.tokenizer import build_tokenizer

    path = tmp_path_factory.mktemp("tiny_hf_clip")
    tok = build_tokenizer(path / "_tok")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=tok.model_max_length,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16)
    CLIPModel(config).save_pretrained(path)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(path)
    return path


def _register_open_clip(tmp: Path, name: str, cfg: dict) -> str:
    import open_clip

    file = tmp / f"{name}.json"
    file.write_text(json.dumps(cfg))
    open_clip.add_model_config(file)
    return name


@pytest.fixture(scope="session")
def tiny_open_clip_names(tmp_path_factory) -> tuple[str, str]:
    """Register two tiny open_clip configs (standard GELU, and QuickGELU with embed_dim 768)."""
    tmp = tmp_path_factory.mktemp("open_clip_cfg")
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    vision = {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16}
    a = _register_open_clip(tmp, TINY_OPEN_CLIP, {"embed_dim": 16, "vision_cfg": vision, "text_cfg": text})
    b = _register_open_clip(tmp, TINY_OPEN_CLIP_QUICKGELU,
                            {"embed_dim": 768, "quick_gelu": True, "vision_cfg": vision, "text_cfg": text})
    return a, b
