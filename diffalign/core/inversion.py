"""Inversion: from a clean latent to a noisy latent at timestep t along the model's own ODE.

Inversion methods (InPO, SmPO, Inversion-DPO) train on the noisy latents that the model itself
maps back to the data, instead of the forward process's random ``x_t``. Three pieces:

* :func:`invert` — deterministic DDIM inversion (DDPM-type models, ε or v) or Euler ODE inversion
  (flow matching) of ``x0`` to each row's timestep ``t``, with the model being trained
  (``model="policy"``) or the frozen reference (``model="reference"``): always an explicit choice.
  Options: InPO's small ``eta`` noise after every step, ReNoise averaging (SmPO), classifier-free
  guidance. Runs without gradients.
* :func:`reparametrised_noise` / :func:`reparametrised_target` — the noise ε̂ with which the forward
  process gives the inverted latent exactly, ``x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε̂`` (flows:
  ``x_σ = (1−σ) x0 + σ ε̂``), and the regression target for it (ε̂, ``v`` or ``ε̂ − x0``).
* :func:`inversion_levels` — the grid the inversion walks (the sampler's grid, ascending).

The step (the mirror of a DDIM / Euler sampling step, as diffusers' ``DDIMInverseScheduler`` and
every inversion paper take it: the model is called at the *level being reached*)::

    DDPM  from level a to b > a:   o = model(x_a, b)
          ε models:  x̂0 = (x_a − √(1−ᾱ_a) o)/√ᾱ_a,   x_b = √ᾱ_b x̂0 + √(1−ᾱ_b) o
          v models (ᾱ = cos²φ, Δ = φ_b − φ_a):  x_b = (x_a + sin Δ · o) / cos Δ
          then  + η s z,  s = √((1−ᾱ_a)/(1−ᾱ_b)·(1−ᾱ_b/ᾱ_a)),  z ~ N(0, I)   (InPO's noise; η = 0 by default)
    flow  from σ_a to σ_b > σ_a:   x_b = x_a + (σ_b − σ_a) · model(x_a, 1000 σ_b)

Both are the step that DDIM (η = 0) / Euler sampling from b with the same model output undoes
exactly (diffusers' inverse scheduler reads a v output at level a instead; the two agree to first
order). The clean latent sits at ``ᾱ = final_alpha_cumprod`` (DDPM; 1 with ``set_alpha_to_one``, else ᾱ_0) or
σ = 0 (flow). The walk visits every grid level below ``t`` and ends with one step to ``t`` itself,
so with ``t`` on the grid, inversion followed by DDIM / Euler sampling on the same grid returns to
``x0`` up to the discretisation error. ReNoise (Garibi et al., 2024; SmPO uses one extra pass):
``o_0 = model(x_a, b)``; for ``k = 1..K``: ``x_b' = step(mean(o_0..o_{k-1}))``, ``o_k = model(x_b', b)``;
finally ``x_b = step(mean(o_0..o_K))``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from diffalign.core.forward import (
    DDPMForward,
    FlowMatchingForward,
    ForwardProcess,
    _expand,
)
from diffalign.models.base import Conditioning

InversionModel = Literal["policy", "reference"]


@dataclass
class InversionStep:
    """The latents after one inversion step.

    ``x``: ``[B, C, h, w]`` fp32; ``timesteps``: ``[B]`` the level each row is at (the denoiser's
    timestep convention); ``active``: ``[B]`` bool, the rows this step moved (a row whose ``t`` was
    already reached stays put).
    """

    x: torch.Tensor
    timesteps: torch.Tensor
    active: torch.Tensor


@dataclass
class InversionOutput:
    """Inverted latents and their re-parametrised training target.

    Attributes:
        x_t: ``[B, C, h, w]`` fp32, the inverted latents at ``timesteps``.
        noise: ``[B, C, h, w]`` ε̂ with ``forward_process.add_noise(x0, ε̂, t) == x_t``.
        target: ``[B, C, h, w]`` the regression target at ``x_t`` for the model's prediction type.
        timesteps: ``[B]`` as given.
        trajectory: every step's latents (``return_trajectory=True``), else None.
        model_calls: denoiser forward passes spent (CFG counts once per batched call).
    """

    x_t: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    trajectory: list[InversionStep] | None = None
    model_calls: int = 0


# ----------------------------------------------------------------------------------- re-parametrisation
def reparametrised_noise(forward_process: ForwardProcess, x0: torch.Tensor, x_t: torch.Tensor,
                         timesteps: torch.Tensor) -> torch.Tensor:
    """ε̂ ``[B, ...]`` such that ``forward_process.add_noise(x0, ε̂, timesteps)`` is ``x_t`` (fp32).

    DDPM: ``(x_t − √ᾱ_t x0) / √(1−ᾱ_t)``; flow: ``(x_t − (1−σ) x0) / σ``.
    """
    x0, x_t = x0.float(), x_t.float()
    if isinstance(forward_process, DDPMForward):
        a = forward_process._abar(timesteps, x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    if isinstance(forward_process, FlowMatchingForward):
        s = forward_process._sigma(timesteps, x_t).clamp_min(1e-6)
        return (x_t - (1 - s) * x0) / s
    raise TypeError(f"no re-parametrisation for {type(forward_process).__name__}")


def reparametrised_target(forward_process: ForwardProcess, x0: torch.Tensor, x_t: torch.Tensor,
                          timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ε̂, target)``: the re-parametrised noise and the regression target for ``x_t``
    (``forward_process.target(x0, ε̂, t)``: ε̂ for ε models, ``√ᾱ ε̂ − √(1−ᾱ) x0`` for v models,
    ``ε̂ − x0`` for flows). InPO's ``eps_hat``, for every prediction type."""
    noise = reparametrised_noise(forward_process, x0, x_t, timesteps)
    return noise, forward_process.target(x0.float(), noise, timesteps)


# ----------------------------------------------------------------------------------- the grid
def inversion_levels(backbone, num_steps: int) -> torch.Tensor:
    """The inversion grid ``[num_steps]``, ascending, in the denoiser's timestep convention.

    DDPM-type: the timesteps of ``DDIMScheduler.set_timesteps(num_steps)`` on the backbone's
    scheduler config (the grid of :class:`~diffalign.core.sampling.DDIMSampler`). Flow: ``T·σ`` on the
    σ grid of the backbone's ``FlowMatchEulerDiscreteScheduler`` (other flow schedulers, or dynamic
    shifting: ``linspace(1, 1/T, n)`` shifted by the forward process's ``shift``).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    fp = backbone.forward_process
    if isinstance(fp, FlowMatchingForward):
        T = fp.num_train_timesteps
        if "FlowMatchEuler" in type(backbone.scheduler).__name__ and not backbone.scheduler.config.get(
                "use_dynamic_shifting", False):
            sched = type(backbone.scheduler).from_config(dict(backbone.scheduler.config))
            sched.set_timesteps(num_steps)
            return (sched.sigmas[:-1].float() * T).flip(0).clone()
        u = torch.linspace(1.0, 1.0 / T, num_steps, dtype=torch.float64)
        sigma = fp.shift * u / (1 + (fp.shift - 1) * u)
        return (sigma * T).float().flip(0)
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(dict(backbone.scheduler.config))
    sched.set_timesteps(num_steps)
    return sched.timesteps.flip(0).clone()


def _clean_alpha(backbone) -> float:
    from diffusers import DDIMScheduler

    return float(DDIMScheduler.from_config(dict(backbone.scheduler.config)).final_alpha_cumprod)


# ----------------------------------------------------------------------------------- inversion
@torch.no_grad()
def invert(
    backbone,
    x0: torch.Tensor,
    timesteps: torch.Tensor,
    cond: Conditioning,
    *,
    model: InversionModel,
    num_steps: int = 10,
    eta: float = 0.0,
    renoise_steps: int = 0,
    guidance_scale: float = 1.0,
    uncond: Conditioning | None = None,
    generator: torch.Generator | None = None,
    return_trajectory: bool = False,
) -> InversionOutput:
    """Invert clean latents ``x0`` ``[B, C, h, w]`` to each row's ``timesteps`` ``[B]`` (module docstring).

    Args:
        backbone: a :class:`~diffalign.models.Backbone`.
        cond: ``[B]`` prompt conditioning of the rows.
        model: ``"policy"`` (the weights being trained, as InPO and SmPO) or ``"reference"`` (the
            frozen model, as Inversion-DPO). No default: the choice changes what is trained.
        num_steps: grid size (:func:`inversion_levels`); a row with timestep ``t`` takes one step per
            grid level below ``t`` plus one to ``t``.
        eta: InPO's noise after each DDPM step, ``η·s·z`` (InPO: 0.1); 0 is deterministic.
            Not defined for flow models.
        renoise_steps: ReNoise passes per step (SmPO: 1); 0 is plain inversion.
        guidance_scale, uncond: classifier-free guidance during inversion (CFG when > 1; ``uncond``
            defaults to the pipeline's negative).
        generator: for the ``eta`` noise (drawn on the CPU, one ``[B, C, h, w]`` draw per step).
        return_trajectory: keep every step's latents (Inversion-DPO trains on all of them).

    Returns:
        :class:`InversionOutput` with the re-parametrised ``noise`` and ``target`` at ``x_t``.
    """
    from diffalign.core.sampling import guided_prediction, prepare_guidance

    if model not in ("policy", "reference"):
        raise ValueError(f"model must be 'policy' or 'reference', not {model!r}")
    if eta < 0 or renoise_steps < 0:
        raise ValueError(f"eta and renoise_steps must be >= 0, got {eta}, {renoise_steps}")
    fp = backbone.forward_process
    flow = isinstance(fp, FlowMatchingForward)
    if flow and eta > 0:
        raise ValueError("eta noise is defined for DDPM-type (DDIM) inversion only; use eta=0 for flow models")
    if not flow and not isinstance(fp, DDPMForward):
        raise TypeError(f"no inversion for {type(fp).__name__}")
    device = x0.device
    timesteps = timesteps.to(device)
    grid = inversion_levels(backbone, num_steps).to(device)
    uncond = prepare_guidance(backbone, cond, uncond, guidance_scale)

    if flow:
        T = fp.num_train_timesteps
        clean = torch.zeros((), device=device)

        def level(t):  # σ of a timestep
            return t.float() / T
    else:
        abar = fp.alphas_cumprod.to(device=device, dtype=torch.float64)
        clean = torch.tensor(-1, device=device)
        init = _clean_alpha(backbone)

        def level(t):  # ᾱ of a level (-1 = the clean latent)
            t = t.long()
            return torch.where(t >= 0, abar[t.clamp(min=0)], torch.full_like(abar[:1], init).expand(t.shape))

    def step(out, x, a, b):
        """One inversion step of rows ``x`` from levels ``a`` to ``b`` given model outputs ``out``."""
        if flow:
            return x + _expand(level(b) - level(a), x) * out
        aa, ab = _expand(level(a), x), _expand(level(b), x)
        if fp.prediction_type == "epsilon":
            x0_hat = (x - (1 - aa).sqrt() * out) / aa.sqrt()
            return ab.sqrt() * x0_hat + (1 - ab).sqrt() * out
        # v: with ᾱ = cos²φ, DDIM sampling b -> a is x_a = cos(φ_b−φ_a) x_b − sin(φ_b−φ_a) v; undo it
        cos = (aa * ab).sqrt() + ((1 - aa) * (1 - ab)).sqrt()
        sin = ((1 - ab) * aa).sqrt() - (ab * (1 - aa)).sqrt()
        return (x + sin * out) / cos

    x = x0.float().clone()
    current = clean.expand(x.shape[0]).clone().to(timesteps.dtype)
    if flow:
        current = current.float()
    trajectory: list[InversionStep] = []
    calls = 0
    ctx = backbone.reference() if model == "reference" else contextlib.nullcontext()
    with ctx:
        for g in [*grid.tolist(), None]:
            nxt = timesteps if g is None else torch.minimum(timesteps, torch.full_like(timesteps, g))
            active = nxt > current
            z = None
            if eta > 0:  # drawn for every row, so the noise does not depend on which rows move
                z = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device)
            if bool(active.any()):
                idx = active.nonzero().squeeze(1)
                xa, a, b = x[idx], current[idx], nxt[idx]
                c = cond[idx]
                u = None if uncond is None else uncond[idx]
                outs = [guided_prediction(backbone, xa, b, c, u, guidance_scale)]
                for _ in range(renoise_steps):
                    x_try = step(torch.stack(outs).mean(0), xa, a, b)
                    outs.append(guided_prediction(backbone, x_try, b, c, u, guidance_scale))
                calls += len(outs)
                xb = step(torch.stack(outs).mean(0), xa, a, b)
                if z is not None:
                    la, lb = level(a), level(b)
                    s = ((1 - la) / (1 - lb) * (1 - lb / la)).clamp_min(0).sqrt()
                    xb = xb + eta * _expand(s, xb) * z[idx]
                x = x.index_copy(0, idx, xb.float())
                current = torch.where(active, nxt, current)
                if return_trajectory:
                    trajectory.append(InversionStep(x.clone(), current.clone(), active))
    noise, target = reparametrised_target(fp, x0, x, timesteps)
    return InversionOutput(x, noise, target, timesteps, trajectory if return_trajectory else None, calls)


__all__ = [
    "InversionModel",
    "InversionOutput",
    "InversionStep",
    "inversion_levels",
    "invert",
    "reparametrised_noise",
    "reparametrised_target",
]
