"""The Wan video backbone: loading, the VAE's latent normalisation and causal frame map, LoRA in plain diffusers."""

import pytest
import torch

from diffalign import testing
from diffalign.core.forward import FlowMatchingForward
from diffalign.models import WanBackbone, detect_family, load_backbone


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    return testing.make_tiny_wan(tmp_path_factory.mktemp("wan") / "wan")


@pytest.fixture
def wan(wan_folder):
    backbone = load_backbone(wan_folder)
    backbone.max_sequence_length = 16
    return backbone


def _clips(n: int = 2, frames: int = 17, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, frames, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_loads_as_wan_with_the_flow_forward_process(wan_folder, wan):
    assert detect_family(wan_folder) == "wan"
    assert isinstance(wan, WanBackbone) and wan.denoiser_name == "transformer"
    fp = wan.forward_process   # UniPC on flow sigmas, as the released Wan 2.1 checkpoints ship
    assert isinstance(fp, FlowMatchingForward) and fp.shift == 3.0
    assert not any(p.requires_grad for p in wan.pipeline.transformer.parameters())


def test_latents_are_normalised_as_the_pipeline_does(wan):
    clips = _clips()
    z = wan.encode_images(clips)
    assert z.shape == (2, 4, 5, 4, 4)
    cfg = wan.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        raw = wan.vae.encode(clips).latent_dist.mode()
        torch.testing.assert_close(z, (raw - mean) / std)
        # the pipeline decodes with latents / (1 / std) + mean
        expected = (wan.vae.decode(z * std + mean).sample / 2 + 0.5).clamp(0, 1)
    video = wan.decode_latents(z)
    assert video.shape == (2, 3, 17, 32, 32)
    torch.testing.assert_close(video, expected)
    assert wan.encode_images(clips[:, :, 0]).shape == (2, 4, 1, 4, 4)  # an image is a one-frame clip


def test_latent_frame_spans_match_the_causal_vae(wan):
    """Changing the pixel frames of latent frame j's span changes latent j and leaves every earlier one alone."""
    spans = wan.latent_frame_spans(17)
    assert spans == [(0, 1), (1, 5), (5, 9), (9, 13), (13, 17)]
    base = _clips(1)
    z0 = wan.encode_images(base)
    for j, (a, b) in enumerate(spans):
        changed = base.clone()
        changed[:, :, a:b] = -changed[:, :, a:b]
        delta = (wan.encode_images(changed) - z0).abs().amax(dim=(0, 1, 3, 4))
        assert delta[j] > 1e-3, (j, delta)
        assert torch.all(delta[:j] == 0), (j, delta)


def test_frame_count_and_size_checks(wan):
    with pytest.raises(ValueError, match=r"1 \+ 4·n frames"):
        wan.encode_images(_clips(1, frames=16))
    with pytest.raises(ValueError, match="multiple of 16"):
        wan.check_frame_size(24, 32)
    wan.check_frame_size(32, 48)


def test_predict_trains_only_the_lora(wan):
    clips = _clips()
    z = wan.encode_images(clips)
    cond = wan.encode_prompt(["a red disc", ""])
    assert cond.prompt_embeds.shape == (2, 16, 32)
    wan.add_lora(rank=4)
    t = torch.tensor([250.0, 750.0])
    out = wan.predict(wan.forward_process.add_noise(z, torch.randn_like(z), t), t, cond)
    assert out.shape == z.shape
    out.square().mean().backward()
    names = {n for n, p in wan.raw_denoiser.named_parameters() if p.grad is not None}
    assert names and all("lora_" in n for n in names)


def _perturb_lora(backbone, scale=0.2):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in backbone.raw_denoiser.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_lora_loads_with_plain_diffusers(tmp_path, wan_folder, wan):
    from diffusers import WanPipeline

    z = wan.encode_images(_clips())
    cond = wan.encode_prompt(["a red disc", "a blue square"])
    t = torch.tensor([300.0, 600.0])
    x_t = wan.forward_process.add_noise(z, torch.randn_like(z), t)
    wan.add_lora(rank=4, alpha=8)
    _perturb_lora(wan)
    wan.save_trained(tmp_path / "final")
    with torch.no_grad():
        policy = wan.predict(x_t, t, cond)
        pipe = WanPipeline.from_pretrained(wan_folder)
        pipe.set_progress_bar_config(disable=True)
        call = lambda: pipe.transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=cond.prompt_embeds,
                                        return_dict=False)[0]
        sample = lambda: pipe("a red disc", height=32, width=32, num_frames=5, num_inference_steps=2,
                              max_sequence_length=16, generator=torch.Generator().manual_seed(0),
                              output_type="np").frames
        plain, before = call(), sample()
        pipe.load_lora_weights(tmp_path / "final")
        loaded, after = call(), sample()
    torch.testing.assert_close(loaded, policy, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, loaded, atol=1e-4)
    assert abs(after - before).max() > 1e-4

    fresh = load_backbone(wan_folder)   # rank/alpha/targets come from the file
    fresh.load_trained(tmp_path / "final")
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x_t, t, cond), policy, rtol=1e-4, atol=1e-5)
