"""Shared fixtures of the evaluation tests: one torch thread, a tiny random SD pipeline folder."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run much faster on one thread than fighting for a shared machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random SD1.x-architecture pipeline saved as a diffusers folder (32 px images)."""
    from diffalign import testing

    return testing.make_tiny_sd(tmp_path_factory.mktemp("eval_tiny") / "sd")


@pytest.fixture(scope="session")
def tiny_sd_lora(tiny_sd, tmp_path_factory):
    """A LoRA for :func:`tiny_sd` in diffusers format (non-zero weights, as after training)."""
    from diffalign.models import load_backbone

    backbone = load_backbone(tiny_sd)
    backbone.add_lora(rank=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in backbone.raw_denoiser.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return backbone.save_trained(tmp_path_factory.mktemp("eval_lora") / "final")
