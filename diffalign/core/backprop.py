"""Sampling with gradients, for reward backpropagation (AlignProp, DRaFT-K / -LV, ReFL).

The same transitions as :mod:`diffalign.core.sampling` (:func:`~diffalign.core.sampling.denoise_step`,
one code path for the DDIM and flow updates), run with autograd on::

    AlignProp / DRaFT (full chain)  x_0 ─step 0─▶ x_1 ─▶ … ─step T−1─▶ x_T;  ∇_θ r(D(x_T)) through every step
    DRaFT-K (truncated)             steps 0 … T−K−1 under no_grad (x_{T−K} is a constant); the last K
                                    steps carry gradients:  x_{i+1} = μ_θ(x_i) + s_i z_i
    ReFL (one-step x̂0)              draw j ∈ [lo, hi]; steps 0 … j−1 under no_grad; one denoiser call
                                    with gradients at x_j:  x̂0 = (x_j − √(1−ᾱ_t) ε̂_θ) / √ᾱ_t   (DDPM ε)
                                                           x̂0 = √ᾱ_t x_j − √(1−ᾱ_t) v̂_θ      (DDPM v)
                                                           x̂0 = x_j − σ_j v̂_θ                (flow)

Each grad-carrying denoiser call can be wrapped in ``torch.utils.checkpoint`` (activations of one
step recomputed in backward: memory stays one step's activations plus the latents of the chain),
as AlignProp does for every UNet call. The per-step noise is drawn outside the checkpointed call,
so recomputation sees the same noise. Images come back in [0, 1] through the backbone's VAE with
gradients (``backbone.decode_latents(..., grad=True)``), ready for a differentiable reward.

AlignProp draws K once per trajectory (``K ~ N(42, 5)`` of 50 in its v2 code, i.e. about the last 8
steps): draw it in the trainer and pass ``grad_steps=T − k``. DRaFT-LV re-noises the final sample
to the last step's noise level and calls :func:`predict_x0` on the copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.core.sampling import (
    Sampler,
    denoise_step,
    draw_step_noise,
    initial_latents,
    prepare_guidance,
    step_prediction,
)
from diffalign.models.base import Conditioning


@dataclass
class BackpropOutput:
    """Result of :func:`sample_with_grad`.

    Attributes:
        latents: ``[B, C, h, w]`` the final latents x_T (fp32; a function of θ through the last K steps).
        images: ``[B, 3, H, W]`` in [0, 1] decoded with gradients, or None when ``decode=False``.
        grad_steps: the step indices whose denoiser call carried gradients.
    """

    latents: torch.Tensor
    images: torch.Tensor | None
    grad_steps: range


def sample_with_grad(backbone, sampler: Sampler, cond: Conditioning, *, uncond: Conditioning | None = None,
                     guidance_scale: float = 1.0, grad_steps: int | None = None, checkpoint: bool = True,
                     decode: bool = True, latents: torch.Tensor | None = None, generator=None,
                     height: int | None = None, width: int | None = None) -> BackpropOutput:
    """Sample ``B = len(cond)`` images with gradients through the last ``grad_steps`` steps.

    Args:
        backbone, sampler, cond, uncond, guidance_scale, latents, generator, height, width: as in
            :func:`~diffalign.core.sampling.sample_trajectory` (same noise order, so with the same
            generator the forward values equal the no-grad rollout's).
        grad_steps: ``K``; the last K steps carry gradients (DRaFT-K; AlignProp with ``K = T − k``).
            None = all ``T`` steps (full-chain DRaFT / AlignProp).
        checkpoint: checkpoint each grad-carrying denoiser call (``torch.utils.checkpoint``).
        decode: also decode the final latents to images in [0, 1] with gradients.
    Returns:
        :class:`BackpropOutput`. Call ``reward(out.images).mean().backward()``.
    """
    T = sampler.num_steps
    K = T if grad_steps is None else int(grad_steps)
    if not 0 <= K <= T:
        raise ValueError(f"grad_steps must be in [0, {T}], got {grad_steps}")
    uncond = prepare_guidance(backbone, cond, uncond, guidance_scale)
    if latents is None:
        latents = initial_latents(backbone, sampler, len(cond), generator=generator, height=height, width=width)
    x = latents.to(backbone.device, torch.float32)
    for i in range(T):
        noise = draw_step_noise(sampler, x, generator, backbone.dtype)
        with torch.set_grad_enabled(i >= T - K and torch.is_grad_enabled()):
            x = denoise_step(backbone, sampler, x, i, cond, uncond, guidance_scale, noise=noise,
                             checkpoint=checkpoint).prev_sample
    images = backbone.decode_latents(x, grad=True) if decode else None
    return BackpropOutput(x, images, range(T - K, T))


def predict_x0(backbone, sampler: Sampler, x: torch.Tensor, step: int, cond: Conditioning, *,
               uncond: Conditioning | None = None, guidance_scale: float = 1.0,
               checkpoint: bool = False) -> torch.Tensor:
    """x̂0 ``[B, C, h, w]`` from ``x`` ``[B, C, h, w]`` at sampler step ``step``, with gradients (one
    guided denoiser call; the x̂0 of the sampler's step). ``uncond`` defaults to the pipeline's
    negative when CFG is on."""
    uncond = prepare_guidance(backbone, cond, uncond, guidance_scale)
    x = x.float()
    index = torch.full((x.shape[0],), step, dtype=torch.long)
    pred = step_prediction(backbone, sampler, x, index, cond, uncond, guidance_scale, checkpoint=checkpoint)
    return sampler.step_mean(pred, index, x)[2]


@dataclass
class ReFLOutput:
    """Result of :func:`refl_x0`.

    Attributes:
        pred_x0: ``[B, C, h, w]`` x̂0 predicted with gradients at step ``step``.
        images: ``[B, 3, H, W]`` in [0, 1] decoded from ``pred_x0`` with gradients (None if not decoded).
        step: the step index ``j`` the one-step prediction was made at.
        timestep: the denoiser's timestep at that step (``sampler.timesteps[step]``).
        x_t: ``[B, C, h, w]`` the latents x_j reached without gradients.
    """

    pred_x0: torch.Tensor
    images: torch.Tensor | None
    step: int
    timestep: torch.Tensor
    x_t: torch.Tensor


def refl_step_range(num_steps: int) -> tuple[int, int]:
    """ReFL's default: the last quarter of the steps, ``[⌊0.75·T⌋, T−1]`` (``[30, 39]`` of 40 as in
    ImageReward's ReFL.py)."""
    return (int(0.75 * num_steps), num_steps - 1)


def refl_x0(backbone, sampler: Sampler, cond: Conditioning, *, uncond: Conditioning | None = None,
            guidance_scale: float = 1.0, step: int | None = None, step_range: tuple[int, int] | None = None,
            checkpoint: bool = False, decode: bool = True, latents: torch.Tensor | None = None, generator=None,
            height: int | None = None, width: int | None = None) -> ReFLOutput:
    """ReFL: sample without gradients to a random late step ``j``, then predict x̂0 with gradients.

    Args:
        step: the step ``j``; if None it is drawn uniformly from ``step_range`` (inclusive, default
            :func:`refl_step_range`), one ``j`` for the whole batch as in ReFL, with the global torch
            RNG (seeded by ``accelerate.utils.set_seed``); ``generator`` serves the noise only, so
            ``x_t`` is where :func:`~diffalign.core.sampling.sample_trajectory` is after ``j`` steps.
        guidance_scale: ReFL samples without CFG (1.0); CFG is available.
        other arguments: as in :func:`sample_with_grad`.
    Returns:
        :class:`ReFLOutput`. ReFL's loss is ``relu(2 − r(images)).mean() · 1e-3`` plus its pre-training
        regulariser (a denoising loss on data), which the trainer adds.
    """
    T = sampler.num_steps
    if step is None:
        lo, hi = step_range if step_range is not None else refl_step_range(T)
        if not 0 <= lo <= hi < T:
            raise ValueError(f"step_range must satisfy 0 <= lo <= hi < {T}, got {(lo, hi)}")
        step = int(torch.randint(lo, hi + 1, (1,)))
    if not 0 <= step < T:
        raise ValueError(f"step must be in [0, {T}), got {step}")
    uncond = prepare_guidance(backbone, cond, uncond, guidance_scale)
    if latents is None:
        latents = initial_latents(backbone, sampler, len(cond), generator=generator, height=height, width=width)
    x = latents.to(backbone.device, torch.float32)
    with torch.no_grad():
        for i in range(step):
            noise = draw_step_noise(sampler, x, generator, backbone.dtype)
            x = denoise_step(backbone, sampler, x, i, cond, uncond, guidance_scale, noise=noise).prev_sample
    x0 = predict_x0(backbone, sampler, x, step, cond, uncond=uncond, guidance_scale=guidance_scale,
                    checkpoint=checkpoint)
    images = backbone.decode_latents(x0, grad=True) if decode else None
    return ReFLOutput(x0, images, step, sampler.timesteps[step], x)
