"""Sampling with gradients: truncation (DRaFT-K), checkpointing, ReFL's one-step x0."""

import pytest
import torch

from diffalign.core.backprop import (
    predict_x0,
    refl_step_range,
    refl_x0,
    sample_with_grad,
)
from diffalign.core.sampling import guided_prediction, make_sampler, sample_trajectory

PROMPTS = ["a photo of a red cat", "a dog"]



@pytest.fixture
def folder(tiny_folder):
    """``folder(name)`` -> a tiny pipeline folder (tests/tiny_pipelines.py), built once per session."""
    return tiny_folder


@pytest.fixture
def lora_backbone(folder):
    """``lora_backbone(name)`` -> a fresh backbone with a non-zero LoRA (B = 0 would zero A's gradient)."""
    from diffalign.models import load_backbone

    def get(name):
        backbone = load_backbone(folder(name))
        backbone.add_lora(rank=4)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in backbone.raw_denoiser.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        return backbone

    return get


def lora_grads(backbone, **kwargs) -> torch.Tensor:
    """Gradient of a brightness reward w.r.t. every LoRA weight, flattened."""
    for p in backbone.trainable_parameters():
        p.grad = None
    sampler = kwargs.pop("sampler")
    out = sample_with_grad(backbone, sampler, backbone.encode_prompt(PROMPTS), guidance_scale=4.0,
                           generator=torch.Generator().manual_seed(0), **kwargs)
    out.images.mean().backward()
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in backbone.trainable_parameters()])


@pytest.mark.parametrize("variant", ["sd", "sd3"])
def test_only_the_last_k_steps_carry_gradients(lora_backbone, variant):
    backbone = lora_backbone(variant)
    sampler = make_sampler(backbone, num_steps=4)
    grad_modes = []
    hook = backbone.raw_denoiser.register_forward_hook(lambda m, a, o: grad_modes.append(torch.is_grad_enabled()))
    try:
        out = sample_with_grad(backbone, sampler, backbone.encode_prompt(PROMPTS), guidance_scale=4.0, grad_steps=2,
                               checkpoint=False, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert grad_modes == [False, False, True, True] and out.grad_steps == range(2, 4)
    assert out.images.shape == (2, 3, 32, 32) and out.images.requires_grad
    assert 0 <= out.images.min() and out.images.max() <= 1
    # the forward values are the no-grad rollout's (one step function, same noise order)
    traj = sample_trajectory(backbone, sampler, backbone.encode_prompt(PROMPTS), guidance_scale=4.0,
                             generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.latents.detach(), traj.final, rtol=0, atol=1e-6)


def test_k1_gradients_reach_lora_and_differ_from_the_full_chain(lora_backbone):
    backbone = lora_backbone("sd")
    sampler = make_sampler(backbone, num_steps=3)
    k1 = lora_grads(backbone, sampler=sampler, grad_steps=1, checkpoint=False)
    full = lora_grads(backbone, sampler=sampler, grad_steps=None, checkpoint=False)
    assert torch.isfinite(k1).all() and torch.isfinite(full).all()
    assert (k1 != 0).float().mean() > 0.5       # the LoRA weights (A and B) get gradients with K = 1
    assert not torch.allclose(k1, full, rtol=1e-3, atol=0)
    # K = 0: nothing trainable in the chain, only the (frozen) VAE
    out = sample_with_grad(backbone, sampler, backbone.encode_prompt(PROMPTS), grad_steps=0, decode=False)
    assert not out.latents.requires_grad and out.images is None


@pytest.mark.parametrize("variant", ["sd", "sd3"])
def test_checkpointed_and_plain_gradients_agree(lora_backbone, variant):
    backbone = lora_backbone(variant)
    sampler = make_sampler(backbone, num_steps=3)
    plain = lora_grads(backbone, sampler=sampler, grad_steps=None, checkpoint=False)
    ckpt = lora_grads(backbone, sampler=sampler, grad_steps=None, checkpoint=True)
    assert plain.abs().max() > 0
    torch.testing.assert_close(ckpt, plain, rtol=1e-5, atol=1e-9)  # recomputation: round-off at most


@pytest.mark.parametrize("variant", ["sd", "sd-v", "sd3"])
def test_refl_x0_is_the_forward_process_x0_at_a_late_step(lora_backbone, variant):
    backbone = lora_backbone(variant)
    sampler = make_sampler(backbone, num_steps=8, eta=1.0)
    assert refl_step_range(40) == (30, 39) and refl_step_range(8) == (6, 7)
    cond = backbone.encode_prompt(PROMPTS)
    grad_modes = []
    hook = backbone.raw_denoiser.register_forward_hook(lambda m, a, o: grad_modes.append(torch.is_grad_enabled()))
    try:
        out = refl_x0(backbone, sampler, cond, generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert 6 <= out.step <= 7 and grad_modes == [False] * out.step + [True]
    assert not out.x_t.requires_grad and out.pred_x0.requires_grad and out.images.requires_grad
    # x_t is where the no-grad rollout is after `step` steps
    traj = sample_trajectory(backbone, sampler, cond, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.x_t, traj.latents[:, out.step], rtol=0, atol=1e-6)
    # x̂0 = the forward process's x0 formula (ε, v or flow) applied to the denoiser's prediction
    t = out.timestep.expand(len(cond))
    with torch.no_grad():
        pred = guided_prediction(backbone, out.x_t, t, cond)
    expected = backbone.forward_process.x0_from_prediction(out.x_t, pred, t)
    torch.testing.assert_close(out.pred_x0.detach(), expected, rtol=1e-4, atol=1e-4)
    out.images.mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in backbone.trainable_parameters())


def test_refl_step_choice_and_predict_x0_with_cfg(lora_backbone):
    backbone = lora_backbone("sd")
    sampler = make_sampler(backbone, num_steps=6)
    cond = backbone.encode_prompt(PROMPTS)
    torch.manual_seed(0)
    steps = {refl_x0(backbone, sampler, cond, step_range=(2, 4), decode=False).step for _ in range(12)}
    assert steps == {2, 3, 4}
    assert refl_x0(backbone, sampler, cond, step=1, decode=False).step == 1
    with pytest.raises(ValueError, match="step_range"):
        refl_x0(backbone, sampler, cond, step_range=(3, 6))
    # with CFG, x̂0 comes from the guided prediction u + w (c − u)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    x0 = predict_x0(backbone, sampler, x, 2, cond, guidance_scale=3.0)
    t = sampler.timesteps[2].expand(2)
    with torch.no_grad():
        uncond = backbone.negative_conditioning(2)
        u, c = guided_prediction(backbone, x, t, uncond), guided_prediction(backbone, x, t, cond)
    expected = backbone.forward_process.x0_from_prediction(x, u + 3.0 * (c - u), t)
    torch.testing.assert_close(x0.detach(), expected, rtol=1e-4, atol=1e-4)
