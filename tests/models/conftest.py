"""Tiny random pipelines, built once per session and loaded fresh per test (LoRA mutates a backbone)."""

import pytest
import torch

from diffalign import testing

BUILDERS = {
    "sd": lambda p: testing.make_tiny_sd(p),
    "sd-v": lambda p: testing.make_tiny_sd(p, prediction_type="v_prediction"),
    "sdxl": lambda p: testing.make_tiny_sdxl(p),
    "sd3": lambda p: testing.make_tiny_sd3(p),
    "sd3-t5": lambda p: testing.make_tiny_sd3(p, with_t5=True),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run ~20x faster on one thread than fighting for a shared machine's cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_pipelines")


@pytest.fixture(scope="session")
def tiny_folder(tiny_root):
    """``tiny_folder(name)`` -> the saved pipeline folder, built on first use."""
    built = {}

    def get(name: str):
        if name not in built:
            built[name] = BUILDERS[name](tiny_root / name)
        return built[name]

    return get


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
