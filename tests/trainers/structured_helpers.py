"""Shared helpers for the inversion / structured-preference method tests: a tiny SD backbone with a
LoRA and hand-made encoded batches."""

from __future__ import annotations

import math

import pytest
import torch

from diffalign.trainers.method import TrainBatch


def tiny_backbone(path, prediction_type: str = "epsilon", lora_rank: int = 4):
    from diffalign import testing
    from diffalign.models import load_backbone

    bb = load_backbone(testing.make_tiny_sd(path, prediction_type=prediction_type))
    bb.add_lora(rank=lora_rank)
    return bb


def move_lora(bb, scale: float = 0.05, seed: int = 0) -> None:
    """Give the LoRA B matrices random values: the policy now differs from the reference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in bb.raw_denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))


def group_batch(bb, prompts: list[list[str]], *, seed: int = 0, scores=None, t=None) -> TrainBatch:
    """A batch of ``len(prompts[0])`` groups with ``len(prompts)`` members each, laid out member-major
    (``[winners, losers]`` for pairs, ``[best, ..., worst]`` for lists); members share noise and t."""
    g = torch.Generator().manual_seed(seed)
    k, b = len(prompts), len(prompts[0])
    latents = 0.8 * torch.randn(k * b, 4, 16, 16, generator=g)
    noise = torch.randn(b, 4, 16, 16, generator=g).repeat(k, 1, 1, 1)
    fp = bb.forward_process
    t = (fp.sample_timesteps(b, generator=g) if t is None else torch.as_tensor(t)).repeat(k)
    flat = [p for member in prompts for p in member]
    return TrainBatch(latents=latents, noise=noise, x_t=fp.add_noise(latents, noise, t),
                      target=fp.target(latents, noise, t), timesteps=t, cond=bb.encode_prompt(flat),
                      weights=torch.ones(b), prompts=flat,
                      scores=None if scores is None else torch.tensor(scores, dtype=torch.float32))


def swap_groups(batch: TrainBatch) -> TrainBatch:
    """The same batch with the member order reversed (winners <-> losers)."""
    import dataclasses

    from diffalign.models.base import Conditioning

    b = batch.weights.shape[0]
    k = batch.latents.shape[0] // b
    idx = torch.cat([torch.arange(j * b, (j + 1) * b) for j in reversed(range(k))])
    return dataclasses.replace(
        batch, latents=batch.latents[idx], noise=batch.noise[idx], x_t=batch.x_t[idx], target=batch.target[idx],
        timesteps=batch.timesteps[idx], cond=Conditioning.cat([batch.cond[i:i + 1] for i in idx.tolist()]),
        prompts=[batch.prompts[i] for i in idx.tolist()],
        scores=None if batch.scores is None else batch.scores[idx])


def lora_grad_norm(bb) -> float:
    return float(sum(p.grad.norm() ** 2 for p in bb.trainable_parameters() if p.grad is not None) ** 0.5)


def beta_scaled_tolerance(beta: float, *errors: torch.Tensor, ulps: float = 4.0) -> float:
    """Absolute tolerance for a loss whose logits are ``β/2`` times a difference of fp32 denoising errors.

    Each error ``[N]`` is exact only to a few ulps of its size: another batching (the hand computation
    calls the model row group by row group) or another CPU kernel (AVX2, AVX-512, scalar) sums in
    another order. A logit ``-β/2·((Lw − Ll) − (Rw − Rl))`` carries four of them, so its own error is
    up to ``β/2 · 4·ulps·ε32·max|L|``; every loss here is a mean of terms whose slope in their logit is
    at most 1, so that bound holds for the loss too. A bare ``rel=1e-4`` on such a loss checks the kernels,
    not the formula (the logit's rounding is amplified β/2 times)."""
    scale = max(float(e.detach().abs().max()) for e in errors)
    return 0.5 * beta * 4 * ulps * torch.finfo(torch.float32).eps * scale


def assert_ln2_at_init_with_gradient(bb, out, min_grad_norm: float = 0.0) -> None:
    """At initialisation (policy == reference) a DPO-form loss is ln 2 and still moves the LoRA weights;
    leaves the gradients cleared."""
    assert float(out.loss) == pytest.approx(math.log(2), abs=1e-6)
    out.loss.backward()
    assert lora_grad_norm(bb) > min_grad_norm
    bb.raw_denoiser.zero_grad()
