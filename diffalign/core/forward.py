"""Forward (noising) processes: one object per schedule family.

A forward process knows how to pick training timesteps, noise a clean latent, name the
regression target of the denoiser and turn a prediction back into an x0 estimate.

* :class:`DDPMForward` — DDPM-type discrete schedules (SD1.x/2.x, SDXL) with
  ``epsilon`` or ``v_prediction`` targets. Alphas come from a diffusers scheduler.
* :class:`FlowMatchingForward` — rectified flow (SD3): ``x_t = (1 - σ) x0 + σ ε``,
  target ``ε - x0``, timestep given to the model as ``1000 · σ``.

Both are built from a diffusers scheduler with :func:`forward_process_from_scheduler`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

TimestepSampling = Literal["uniform", "logit_normal"]


@dataclass
class NoisyBatch:
    """A noised batch. All tensors are ``[B, ...]`` on the latents' device.

    ``timesteps`` is what the denoiser is called with (integer DDPM step, or ``1000·σ`` for flows);
    ``target`` is the denoiser's regression target for ``x_t``.
    """

    x_t: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    target: torch.Tensor


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class ForwardProcess:
    """Shared API; subclasses implement the schedule."""

    prediction_type: str

    def sample_timesteps(self, n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        raise NotImplementedError

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def x0_from_prediction(self, x_t: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def noise_examples(self, x0: torch.Tensor, generators: Sequence[torch.Generator], *,
                       group_size: int = 1) -> NoisyBatch:
        """Noise a batch of ``B`` examples of ``group_size`` members each, one generator per example.

        ``x0`` is ``[group_size·B, ...]`` laid out member-major: ``[winners (B), losers (B)]`` for pairs,
        ``[best (B), ..., worst (B)]`` for ranked lists, ``[B]`` rows for single images. Example ``i``'s
        generator (seeded by its run position, :mod:`diffalign.core.positions`) draws its noise
        ``x0.shape[1:]`` and then its timestep, on the CPU, so a batch's noise does not depend on which
        other examples it holds; every member of a group gets the same noise and timestep, as every
        Diffusion-DPO implementation does. This is the one place training batches are noised.
        """
        b = len(generators)
        if x0.shape[0] != group_size * b:
            raise ValueError(f"batch of {x0.shape[0]} rows is not {group_size} members x {b} examples")
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators])
        t = torch.cat([self.sample_timesteps(1, generator=g) for g in generators])
        noise = noise.to(x0.device, x0.dtype).repeat(group_size, *([1] * (x0.ndim - 1)))
        t = t.to(x0.device).repeat(group_size)
        return NoisyBatch(self.add_noise(x0, noise, t), t, noise, self.target(x0, noise, t))


class DDPMForward(ForwardProcess):
    """Discrete DDPM schedule: ``x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε`` for integer ``t ∈ [0, T)``.

    Args:
        alphas_cumprod: ``[T]`` cumulative products ᾱ_t (from the diffusers scheduler).
        prediction_type: ``"epsilon"`` (target ε) or ``"v_prediction"`` (target ``√ᾱ ε − √(1−ᾱ) x0``).
        timestep_sampling: ``"uniform"`` over ``[0, T)`` (the Diffusion-DPO default) or ``"logit_normal"``.
    """

    def __init__(
        self,
        alphas_cumprod: torch.Tensor,
        prediction_type: str = "epsilon",
        timestep_sampling: TimestepSampling = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
    ):
        if prediction_type not in {"epsilon", "v_prediction"}:
            raise ValueError(f"DDPM forward process supports 'epsilon' and 'v_prediction', not {prediction_type!r}")
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()
        self.prediction_type = prediction_type
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def sample_timesteps(self, n, *, generator=None, device=None):
        T = self.num_train_timesteps
        if self.timestep_sampling == "uniform":
            t = torch.randint(0, T, (n,), generator=generator)
        elif self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator))
            t = (u * T).long().clamp(0, T - 1)
        else:
            raise ValueError(f"unknown timestep sampling {self.timestep_sampling!r}")
        return t.to(device)

    def _abar(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return _expand(self.alphas_cumprod[timesteps.long().cpu()].to(like.device), like)

    def add_noise(self, x0, noise, timesteps):
        a = self._abar(timesteps, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        a = self._abar(timesteps, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def x0_from_prediction(self, x_t, prediction, timesteps):
        a = self._abar(timesteps, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * prediction) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * prediction

    def eps_from_prediction(self, x_t, prediction, timesteps):
        """The noise estimate ε̂ implied by a prediction (identity for epsilon models)."""
        if self.prediction_type == "epsilon":
            return prediction
        a = self._abar(timesteps, x_t)
        return (1 - a).sqrt() * x_t + a.sqrt() * prediction


class FlowMatchingForward(ForwardProcess):
    """Rectified flow as in SD3: ``x_σ = (1−σ) x0 + σ ε``, target ``ε − x0``, model timestep ``1000·σ``.

    Args:
        shift: the scheduler's time shift ``σ ← shift·σ / (1 + (shift−1)·σ)`` (SD3 uses 3.0).
        timestep_sampling: ``"logit_normal"`` (SD3's default, mean 0, std 1) or ``"uniform"``.
        num_train_timesteps: the scale of the model's timestep input (1000).
    """

    prediction_type = "flow"

    def __init__(
        self,
        shift: float = 1.0,
        timestep_sampling: TimestepSampling = "logit_normal",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        num_train_timesteps: int = 1000,
    ):
        self.shift = shift
        self.timestep_sampling = timestep_sampling
        self.logit_mean, self.logit_std = logit_mean, logit_std
        self.num_train_timesteps = num_train_timesteps

    def sample_sigmas(self, n, *, generator=None, device=None) -> torch.Tensor:
        if self.timestep_sampling == "logit_normal":
            u = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator))
        elif self.timestep_sampling == "uniform":
            u = torch.rand(n, generator=generator)
        else:
            raise ValueError(f"unknown timestep sampling {self.timestep_sampling!r}")
        u = u.clamp(1e-4, 1.0)
        sigma = self.shift * u / (1 + (self.shift - 1) * u)
        return sigma.to(device)

    def sample_timesteps(self, n, *, generator=None, device=None):
        return self.sample_sigmas(n, generator=generator, device=device) * self.num_train_timesteps

    def _sigma(self, timesteps, like):
        return _expand(timesteps.to(like.device) / self.num_train_timesteps, like)

    def add_noise(self, x0, noise, timesteps):
        s = self._sigma(timesteps, x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0, noise, timesteps):
        return noise - x0

    def x0_from_prediction(self, x_t, prediction, timesteps):
        return x_t - self._sigma(timesteps, x_t) * prediction

    def eps_from_prediction(self, x_t, prediction, timesteps):
        return x_t + (1 - self._sigma(timesteps, x_t)) * prediction


def forward_process_from_scheduler(scheduler, timestep_sampling: TimestepSampling | None = None) -> ForwardProcess:
    """Build the forward process matching a diffusers scheduler's config.

    The scheduler says what the model predicts, as it does for diffusers' own sampling:

    * ``FlowMatch*`` schedulers, and multistep solvers on flow sigmas (``use_flow_sigmas: true`` with
      ``prediction_type: flow_prediction``, e.g. Wan's UniPC with ``flow_shift``) give
      :class:`FlowMatchingForward` (logit-normal by default);
    * schedulers with ``alphas_cumprod`` give :class:`DDPMForward` with the config's ``prediction_type``
      (``epsilon`` or ``v_prediction``; uniform by default).

    A config that mixes the two (``flow_prediction`` on a DDPM schedule without ``use_flow_sigmas``, as
    an edited SD ``scheduler_config.json`` would have; or flow sigmas with an ``epsilon`` / ``v_prediction``
    target) is a :class:`~diffalign.errors.UsageError`: diffusers would sample such a model with
    neither process, and training must not pick one silently.
    """
    from diffalign.errors import UsageError

    config = scheduler.config
    if "FlowMatch" in type(scheduler).__name__:
        # the training grid is the scheduler's init grid, which applies ``shift`` only without dynamic shifting
        # (FLUX.1-dev: shift 3.0 with use_dynamic_shifting, so its diffusers script trains on unshifted σ)
        return FlowMatchingForward(
            shift=1.0 if config.get("use_dynamic_shifting", False) else float(config.get("shift", 1.0)),
            timestep_sampling=timestep_sampling or "logit_normal",
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        )
    prediction = config.get("prediction_type", "epsilon")
    flow_sigmas = bool(config.get("use_flow_sigmas"))
    name = type(scheduler).__name__
    if flow_sigmas != (prediction == "flow_prediction"):
        raise UsageError(
            f"the model's scheduler config ({name}) has prediction_type {prediction!r} and use_flow_sigmas "
            f"{flow_sigmas}: a flow model sets both (prediction_type: flow_prediction, use_flow_sigmas: true), an "
            "epsilon / v_prediction model neither; fix the model's scheduler/scheduler_config.json")
    if flow_sigmas:
        # multistep solvers run on flow sigmas (Wan's UniPC): the same rectified flow, shifted by flow_shift
        return FlowMatchingForward(
            shift=float(config.get("flow_shift", 1.0)),
            timestep_sampling=timestep_sampling or "logit_normal",
            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        )
    if not hasattr(scheduler, "alphas_cumprod"):
        raise TypeError(f"cannot derive a forward process from {type(scheduler).__name__}")
    if prediction not in ("epsilon", "v_prediction"):
        raise UsageError(f"the model's scheduler config ({name}) has prediction_type {prediction!r}; diffalign trains "
                         "epsilon and v_prediction models on DDPM schedules (and flow models)")
    return DDPMForward(
        scheduler.alphas_cumprod,
        prediction_type=prediction,
        timestep_sampling=timestep_sampling or "uniform",
    )
