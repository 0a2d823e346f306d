"""Tiny random pipelines, built once per session and loaded fresh per test (LoRA mutates a backbone)."""

import pytest
import torch
from tiny_pipelines import BUILDERS


@pytest.fixture(params=list(BUILDERS))
def variant(request):
    return request.param


@pytest.fixture
def backbone(tiny_folder, variant):
    from diffalign.models import load_backbone

    return load_backbone(tiny_folder(variant))


@pytest.fixture
def inputs():
    return make_inputs


@pytest.fixture
def perturb_lora():
    return perturb_lora_weights


def make_inputs(backbone, n: int = 2, seed: int = 0):
    """(x_t, timesteps, cond) for ``n`` prompts, one of them empty (caption dropout)."""
    g = torch.Generator().manual_seed(seed)
    cond = backbone.encode_prompt(["a photo of a red cat", ""][:n] + ["a dog"] * max(0, n - 2))
    x0 = torch.randn(n, 4, 16, 16, generator=g)
    t = backbone.forward_process.sample_timesteps(n, generator=g)
    return backbone.forward_process.add_noise(x0, torch.randn(x0.shape, generator=g), t), t, cond


def perturb_lora_weights(backbone, seed: int = 1, scale: float = 0.1):
    """Make every LoRA weight non-zero, as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.raw_denoiser.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
