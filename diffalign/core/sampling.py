"""Stochastic samplers that record a trajectory with per-step transition log-probs.

On-line methods (DDPO, Flow-GRPO, D3PO, SPO, SePPO) treat sampling as a policy: each denoising step
is a Gaussian transition ``p_θ(x_{i+1} | x_i, c) = N(μ_θ(x_i, t_i, c), s_i² I)``. Indices count
sampler steps: step ``i`` goes from ``x_i`` to ``x_{i+1}``, ``x_0`` is the initial noise (not DDPM's
clean x0, which is written x̂0 here) and ``x_T`` the sample. The two families::

    DDIM with η (SD1.x/2.x, SDXL; ε or v prediction; ddpo-pytorch's ddim_step_with_logprob)
        t = timesteps[i],  t' = t − T_train // T  (ᾱ_{t'} = final_alpha_cumprod when t' < 0)
        ε̂  = ε_u + w (ε_c − ε_u)                     (v models: ε̂ = √ᾱ_t v̂ + √(1−ᾱ_t) x)
        x̂0 = (x − √(1−ᾱ_t) ε̂) / √ᾱ_t                 (v models: x̂0 = √ᾱ_t x − √(1−ᾱ_t) v̂)
        s  = η √( (1−ᾱ_{t'})/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_{t'}) )
        μ  = √ᾱ_{t'} x̂0 + √(1 − ᾱ_{t'} − s²) ε̂
        η = 0 is DDIM (deterministic), η = 1 is DDPM-like ancestral sampling.

    Flow SDE (SD3; Flow-GRPO's sde_step_with_logprob), σ_i = sigmas[i] from 1 down to σ_T = 0
        dt = σ_{i+1} − σ_i < 0,   v̂ = v_u + w (v_c − v_u)
        g  = a √( σ_i / (1 − σ_i) )                  (σ_i = 1 uses σ_1 in the denominator)
        μ  = x (1 + g² dt / (2σ_i)) + v̂ (1 + g² (1 − σ_i) / (2σ_i)) dt
           = x + [v̂ + g²/(2σ_i) · ε̂] dt,  ε̂ = x + (1 − σ_i) v̂   (drift − ½ g² ∇log p)
        s  = g √(−dt);   a = 0 is the scheduler's Euler ODE step x + v̂ dt.

    CPS, coefficient-preserving SDE (``sde_type="cps"``; Flow-GRPO's ``sde_type="cps"``, arXiv 2509.05952)
        s  = σ_{i+1} sin(η π/2),   x̂0 = x − σ_i v̂,   x̂1 = x + (1 − σ_i) v̂
        μ  = (1 − σ_{i+1}) x̂0 + √(σ_{i+1}² − s²) x̂1
        x_{i+1} = μ + s z keeps the forward marginal's form (1 − σ') x0 + σ' ε: the noise std is
        √(σ'² − s² + s²) = σ'. η = 0 is the Euler ODE step; the last step (σ' = 0) is deterministic.
        log p = −R[(x_{i+1} − μ)²] as coded (constants and the 1/(2s²) dropped), so its PPO ratio is
        ``2s²`` times sharper-scaled than the Gaussian's: clip ranges do not carry over between the types.

    SDE window (``sde_window=(start, end)``; Flow-GRPO-Fast, MixGRPO): the noise level is 0 (Euler ODE,
    ``s = 0``) at every step outside ``start ≤ i < end``, so only window steps are stochastic and trained.

    Both:  x_{i+1} = μ + s z,  z ~ N(0, I)
           log p(x_{i+1} | x_i) = R_{C,h,w}[ −(x_{i+1} − μ)² / (2 s²) − log s − ½ log 2π ]

``R`` is the reduction over the non-batch dims: ``"mean"`` as every original (ddpo-pytorch, Flow-GRPO,
DanceGRPO; PPO clip ranges of 1e-4 assume it) or ``"sum"`` (the true density). Steps with ``s = 0``
(η = 0, a = 0, or DDIM's last step when ``set_alpha_to_one``) are deterministic: their log-prob is
reported as 0 and they carry no policy gradient (``sampler.stds`` tells which steps those are).

The schedule (timesteps, ᾱ, σ, shift) comes from the diffusers scheduler itself (``DDIMScheduler`` /
``FlowMatchEulerDiscreteScheduler`` built from the backbone's scheduler config); initial noise is
drawn as the pipelines draw it (``randn_tensor`` with the generator, times ``init_noise_sigma``), so
with η = 0 / a = 0 :func:`sample_trajectory` gives the diffusers pipeline's images for the same seed.
All step maths is fp32; the denoiser sees ``x`` in the backbone's dtype.

For trainers::

    sampler = make_sampler(backbone, num_steps=10, eta=1.0)          # DDIM (η) or flow SDE (a) by family
    with torch.no_grad():
        traj = sample_trajectory(backbone, sampler, backbone.encode_prompt(prompts),
                                 guidance_scale=5.0, generator=g)    # rollout: traj.log_probs [B, T]
    images = backbone.decode_latents(traj.final)
    # PPO / D3PO update on a minibatch and step j (same batch size as the rollout for ratio == 1):
    new = transition_log_probs(backbone, traj[idx], j)               # policy, with grad: [b, 1]
    ratio = (new.log_prob - traj[idx].log_probs[:, [j]]).exp()
    with torch.no_grad(), backbone.reference():
        ref = transition_log_probs(backbone, traj[idx], j)           # reference (LoRA off)
    kl = gaussian_kl(new.mean, ref.mean, new.std)                    # [b, 1]

Numerics: recomputing a transition gives the stored log-prob bit for bit when the denoiser sees a
batch of the same size as at sampling time (and the same device, dtype and attention backend); a
batch of another size changes the kernels' blocking, and with it the result by float round-off
(~1e-6 relative in fp32, far more in bf16), which moves the PPO ratio off 1.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from diffalign.models.base import Conditioning

Reduction = Literal["mean", "sum"]
SDEType = Literal["sde", "cps"]
SDE_TYPES = ("sde", "cps")
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------- densities
def _reduce(x: torch.Tensor, reduction: Reduction) -> torch.Tensor:
    dims = tuple(range(1, x.ndim))
    if reduction == "mean":
        return x.mean(dim=dims)
    if reduction == "sum":
        return x.sum(dim=dims)
    raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                      reduction: Reduction = "mean") -> torch.Tensor:
    """``log N(x; mean, std² I)`` reduced over non-batch dims: ``[B]`` (fp32).

    ``x``, ``mean``: ``[B, ...]``; ``std``: broadcastable (``[B, 1, 1, 1]``). ``x`` is detached, so
    gradients reach the model only through ``mean``. Elements with ``std == 0`` contribute 0.
    """
    x, mean, std = x.detach().float(), mean.float(), std.float().expand_as(mean)
    stochastic = std > 0
    safe = torch.where(stochastic, std, torch.ones_like(std))  # no inf/nan in the masked branch's grad
    elem = -((x - mean) ** 2) / (2 * safe**2) - torch.log(safe) - _HALF_LOG_2PI
    return _reduce(elem * stochastic, reduction)


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor,
                reduction: Reduction = "mean") -> torch.Tensor:
    """``KL(N(mean, s²I) ‖ N(ref_mean, s²I)) = R[(mean − ref_mean)² / (2 s²)]`` for two transitions of
    equal variance (policy and reference from the same ``x_j``).

    ``std`` gives the leading dims (``[b, K]`` with ``mean [b, K, C, h, w]`` from
    :class:`TransitionLogProbs`, or ``[B]`` with ``mean [B, C, h, w]``); the remaining dims of
    ``mean`` are reduced, so the result has ``std``'s shape. ``s = 0`` gives 0.

    Flow-GRPO's coded KL divides by ``g²`` instead of ``s² = g²·|dt|`` (its issues #22, #78); this
    is the exact Gaussian KL.
    """
    lead = std.ndim
    if tuple(mean.shape[:lead]) != tuple(std.shape) or ref_mean.shape != mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} / ref_mean {tuple(ref_mean.shape)} must share std's leading "
                         f"shape {tuple(std.shape)}")
    std = std.float().reshape(*std.shape, *([1] * (mean.ndim - lead)))
    stochastic = std > 0
    safe = torch.where(stochastic, std, torch.ones_like(std))
    elem = ((mean.float() - ref_mean.float()) ** 2 / (2 * safe**2) * stochastic).flatten(start_dim=lead)
    if reduction == "mean":
        return elem.mean(-1)
    if reduction == "sum":
        return elem.sum(-1)
    raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")


# ---------------------------------------------------------------------------------------- samplers
@dataclass
class StepOutput:
    """One transition for a batch; tensors fp32.

    Attributes:
        prev_sample: ``[B, C, h, w]`` x_{i+1} (the given ``prev_sample`` when recomputing).
        log_prob: ``[B]`` log p(x_{i+1} | x_i) with the sampler's reduction (0 where ``std == 0``).
        mean: ``[B, C, h, w]`` μ_θ(x_i), differentiable w.r.t. the model output.
        std: ``[B, 1, 1, 1]`` the transition's standard deviation s_i.
        pred_x0: ``[B, C, h, w]`` the clean-latent estimate x̂0 at this step.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    pred_x0: torch.Tensor


def _gather(table: torch.Tensor, index: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return table.to(like.device)[index.to(like.device)].reshape(-1, *([1] * (like.ndim - 1)))


class Sampler(ABC):
    """A discretised reverse process with Gaussian transitions (see the module docstring).

    Attributes:
        num_steps: ``T``, the number of transitions.
        timesteps: ``[T]`` what the denoiser is called with at step ``i`` (as the pipeline calls it).
        stds: ``[T]`` the transition standard deviations ``s_i`` (0 = deterministic step).
        reduction: how per-element log-densities become a per-sample log-prob.
        init_noise_sigma: scale of the initial noise (the scheduler's).
    """

    kind: ClassVar[str]
    num_steps: int
    timesteps: torch.Tensor
    stds: torch.Tensor
    reduction: Reduction
    init_noise_sigma: float = 1.0

    @property
    @abstractmethod
    def eta(self) -> float:
        """The stochasticity knob: DDIM's η or the flow SDE's noise level ``a``."""

    @abstractmethod
    def step_mean(self, model_output: torch.Tensor, step_index: torch.Tensor,
                  x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(μ, s, x̂0)`` of step ``step_index`` ``[B]`` from ``x`` ``[B, C, h, w]`` (fp32)."""

    def step(self, model_output: torch.Tensor, step_index: torch.Tensor | int, x: torch.Tensor, *,
             prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> StepOutput:
        """One transition ``x_i → x_{i+1}`` and its log-prob.

        Args:
            model_output: ``[B, C, h, w]`` the (guided) denoiser output at ``x``.
            step_index: ``[B]`` (or one int for all) step indices ``i`` into :attr:`timesteps`.
            x: ``[B, C, h, w]`` the current latents ``x_i``.
            prev_sample: the stored ``x_{i+1}`` to score; if None it is drawn as ``μ + s·noise``.
            noise: ``[B, C, h, w]`` standard normal noise for the draw (``torch.randn_like`` if None).
        """
        x = x.float()
        if isinstance(step_index, int):
            step_index = torch.full((x.shape[0],), step_index, dtype=torch.long)
        mean, std, pred_x0 = self.step_mean(model_output.float(), step_index, x)
        if prev_sample is None:
            if bool((std > 0).any()):
                noise = torch.randn_like(mean) if noise is None else noise.to(mean)
                prev_sample = mean + std * noise
            else:
                prev_sample = mean
        prev_sample = prev_sample.float()
        return StepOutput(prev_sample, self.log_prob(prev_sample, mean, std), mean, std, pred_x0)

    def log_prob(self, prev_sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """``[B]`` the transition log-prob of ``prev_sample`` (:func:`gaussian_log_prob`, 0 where ``std == 0``)."""
        return gaussian_log_prob(prev_sample, mean, std, self.reduction)

    @property
    @abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable settings; :func:`sampler_from_config` rebuilds the sampler from them."""


class DDIMSampler(Sampler):
    """DDIM with η on a ``DDIMScheduler`` built from ``scheduler_config`` (any DDPM-type scheduler's
    config: PNDM, Euler, DDPM, DDIM); ``epsilon`` and ``v_prediction`` models.

    Args:
        scheduler_config: a diffusers scheduler config (``backbone.scheduler.config``).
        num_steps: sampler steps ``T`` (timesteps from ``DDIMScheduler.set_timesteps``).
        eta: η; 1.0 (DDPM-like, ddpo-pytorch's default) makes every step stochastic, 0 is DDIM.
        reduction: ``"mean"`` (the originals) or ``"sum"`` over latent dims.
    """

    kind = "ddim"

    def __init__(self, scheduler_config: dict, num_steps: int = 50, eta: float = 1.0,
                 reduction: Reduction = "mean"):
        from diffusers import DDIMScheduler

        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        self.scheduler = DDIMScheduler.from_config(dict(scheduler_config))
        cfg = self.scheduler.config
        if cfg.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"DDIM sampling supports epsilon and v_prediction models, not {cfg.prediction_type!r}")
        if cfg.thresholding:
            raise ValueError("DDIM sampling with dynamic thresholding is not supported; set thresholding=False")
        self.scheduler.set_timesteps(num_steps)
        self.num_steps, self._eta, self.reduction = num_steps, float(eta), reduction
        self.prediction_type = cfg.prediction_type
        self.init_noise_sigma = float(self.scheduler.init_noise_sigma)
        self.timesteps = self.scheduler.timesteps.clone()                       # [T] int64
        abar = self.scheduler.alphas_cumprod.to(torch.float32)
        prev = self.timesteps - cfg.num_train_timesteps // num_steps             # diffusers' previous timestep
        self.alpha_t = abar[self.timesteps]                                      # [T] ᾱ_t
        final = torch.as_tensor(self.scheduler.final_alpha_cumprod, dtype=torch.float32)
        self.alpha_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], final)  # [T] ᾱ_{t'}
        variance = (1 - self.alpha_prev) / (1 - self.alpha_t) * (1 - self.alpha_t / self.alpha_prev)
        self.stds = self._eta * variance**0.5                                    # [T] s_i

    @classmethod
    def from_scheduler(cls, scheduler, **kwargs) -> DDIMSampler:
        return cls(dict(scheduler.config), **kwargs)

    @property
    def eta(self) -> float:
        return self._eta

    def step_mean(self, model_output, step_index, x):
        a_t = _gather(self.alpha_t, step_index, x)
        a_prev = _gather(self.alpha_prev, step_index, x)
        std = _gather(self.stds, step_index, x)
        if self.prediction_type == "epsilon":
            eps = model_output
            pred_x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        else:
            pred_x0 = a_t**0.5 * x - (1 - a_t) ** 0.5 * model_output
            eps = a_t**0.5 * model_output + (1 - a_t) ** 0.5 * x
        if self.scheduler.config.clip_sample:
            r = self.scheduler.config.clip_sample_range
            pred_x0 = pred_x0.clamp(-r, r)
        mean = a_prev**0.5 * pred_x0 + (1 - a_prev - std**2) ** 0.5 * eps
        return mean, std, pred_x0

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_steps": self.num_steps, "eta": self._eta, "reduction": self.reduction,
                "scheduler_config": dict(self.scheduler.config)}


class FlowSDESampler(Sampler):
    """Flow-GRPO's SDE sampler on a ``FlowMatchEulerDiscreteScheduler`` (SD3): the Euler ODE step plus
    the score correction and noise that keep the marginals (module docstring).

    Args:
        scheduler_config: the flow-matching scheduler's config (``backbone.scheduler.config``); its
            ``shift`` (SD3: 3.0) shapes the σ schedule through ``set_timesteps``.
        num_steps: sampler steps ``T``.
        noise_level: ``a``; Flow-GRPO trains with 0.7; 0 gives the deterministic Euler ODE step.
        reduction: ``"mean"`` (Flow-GRPO) or ``"sum"``.
        mu: resolution-dependent shift for configs with ``use_dynamic_shifting`` (the pipeline's
            ``calculate_shift(image_seq_len, ...)``); must be None otherwise.
        sigmas: the unshifted σ grid the pipeline passes to ``set_timesteps`` (Qwen-Image, Z-Image, FLUX.1:
            ``linspace(1, 1/T, T)``); None for the scheduler's own (SD3).
        sde_type: ``"sde"`` (Flow-GRPO's SDE, the default) or ``"cps"`` (coefficient-preserving
            sampling; Flow-GRPO-Fast's configs use it with noise level 0.8).
        sde_window: ``(start, end)``: noise only at steps ``start ≤ i < end``, Euler ODE steps
            elsewhere (Flow-GRPO-Fast, MixGRPO); None: every step stochastic.
    """

    kind = "flow_sde"

    def __init__(self, scheduler_config: dict, num_steps: int = 10, noise_level: float = 0.7,
                 reduction: Reduction = "mean", mu: float | None = None, sigmas: list[float] | None = None,
                 sde_type: SDEType = "sde", sde_window: tuple[int, int] | None = None):
        from diffusers import FlowMatchEulerDiscreteScheduler

        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
        if noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level}")
        if sde_type not in SDE_TYPES:
            raise ValueError(f"sde_type must be one of {SDE_TYPES}, not {sde_type!r}")
        if sde_window is not None:
            sde_window = (int(sde_window[0]), int(sde_window[1]))
            if not 0 <= sde_window[0] < sde_window[1] <= num_steps:
                raise ValueError(f"sde_window {sde_window} must satisfy 0 <= start < end <= num_steps ({num_steps})")
        sched = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
        if sched.config.get("invert_sigmas", False) or sched.config.get("stochastic_sampling", False):
            raise ValueError("flow SDE sampling needs sigmas running from 1 to 0 with Euler steps "
                             "(invert_sigmas and stochastic_sampling must be off)")
        if sched.config.get("use_dynamic_shifting", False) and mu is None:
            raise ValueError("this scheduler uses dynamic shifting: pass mu (diffusers' calculate_shift of the "
                             "image sequence length, as the pipeline computes it)")
        if sigmas is not None and len(sigmas) != num_steps:
            raise ValueError(f"{len(sigmas)} sigmas for {num_steps} steps")
        sigmas = None if sigmas is None else [float(v) for v in sigmas]
        sched.set_timesteps(None if sigmas is not None else num_steps, sigmas=sigmas, mu=mu)
        self.scheduler, self.mu, self.custom_sigmas = sched, mu, sigmas
        self.num_steps, self.noise_level, self.reduction = num_steps, float(noise_level), reduction
        self.sde_type, self.sde_window = sde_type, sde_window
        self.init_noise_sigma = float(getattr(sched, "init_noise_sigma", 1.0))  # the SD3 pipeline does not scale
        self.timesteps = sched.timesteps.clone().float()                          # [T] 1000·σ
        self.sigmas = sched.sigmas.clone().float()                                # [T+1], last 0
        sigma, sigma_next = self.sigmas[:-1], self.sigmas[1:]
        self.dt = sigma_next - sigma                                              # [T] < 0
        levels = torch.full((num_steps,), self.noise_level)                       # [T] per-step a / η
        if sde_window is not None:
            inside = torch.zeros(num_steps, dtype=torch.bool)
            inside[sde_window[0]:sde_window[1]] = True
            levels = torch.where(inside, levels, torch.zeros_like(levels))
        self.levels = levels
        if sde_type == "cps":
            self.stds = sigma_next * torch.sin(levels * math.pi / 2)              # [T] s_i = σ' sin(ηπ/2)
            self.g = self.stds                                                    # Flow-GRPO's std_dev_t for cps
        else:
            denom = 1 - torch.where(sigma == 1, self.sigmas[1], sigma)
            self.g = levels * (sigma / denom) ** 0.5                              # [T] Flow-GRPO's std_dev_t
            self.stds = self.g * (-self.dt) ** 0.5                                # [T] s_i

    @classmethod
    def from_scheduler(cls, scheduler, **kwargs) -> FlowSDESampler:
        return cls(dict(scheduler.config), **kwargs)

    @property
    def eta(self) -> float:
        return self.noise_level

    def step_mean(self, model_output, step_index, x):
        sigma = _gather(self.sigmas[:-1], step_index, x)
        dt = _gather(self.dt, step_index, x)
        g = _gather(self.g, step_index, x)
        std = _gather(self.stds, step_index, x)
        v = model_output
        if self.sde_type == "cps":
            sigma_next = sigma + dt
            pred_x0, pred_x1 = x - sigma * v, x + (1 - sigma) * v
            mean = (1 - sigma_next) * pred_x0 + (sigma_next**2 - std**2).clamp(min=0) ** 0.5 * pred_x1
            return mean, std, pred_x0
        mean = x * (1 + g**2 / (2 * sigma) * dt) + v * (1 + g**2 * (1 - sigma) / (2 * sigma)) * dt
        return mean, std, x - sigma * v

    def log_prob(self, prev_sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """``sde``: the Gaussian log-density; ``cps``: Flow-GRPO's ``−R[(x' − μ)²]`` (module docstring)."""
        if self.sde_type != "cps":
            return super().log_prob(prev_sample, mean, std)
        stochastic = (std.float() > 0).expand_as(mean)
        elem = -((prev_sample.detach().float() - mean.float()) ** 2)
        return _reduce(elem * stochastic, self.reduction)

    def with_window(self, sde_window: tuple[int, int] | None) -> FlowSDESampler:
        """The same sampler with noise only at steps ``start ≤ i < end`` (Euler ODE steps elsewhere)."""
        return sampler_from_config({**self.config, "sde_window": sde_window})

    @property
    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_steps": self.num_steps, "noise_level": self.noise_level,
                "reduction": self.reduction, "mu": self.mu, "sigmas": self.custom_sigmas, "sde_type": self.sde_type,
                "sde_window": None if self.sde_window is None else list(self.sde_window),
                "scheduler_config": dict(self.scheduler.config)}


SAMPLERS: dict[str, type[Sampler]] = {"ddim": DDIMSampler, "flow_sde": FlowSDESampler}


def sampler_from_config(config: dict[str, Any]) -> Sampler:
    """Rebuild a sampler from its :attr:`Sampler.config`."""
    config = dict(config)
    kind = config.pop("kind")
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler kind {kind!r}; choose from {sorted(SAMPLERS)}")
    return SAMPLERS[kind](**config)


def make_sampler(backbone_or_scheduler, num_steps: int, eta: float | None = None,
                 reduction: Reduction = "mean", resolution: int | None = None, sde_type: SDEType = "sde",
                 sde_window: tuple[int, int] | None = None) -> Sampler:
    """The sampler for a backbone's (or scheduler's) family.

    Flow-matching schedulers (SD3) give :class:`FlowSDESampler` with noise level ``eta`` (default
    0.7, Flow-GRPO), ``sde_type`` (``"sde"`` or ``"cps"``) and an optional ``sde_window``, on the σ
    grid the pipeline samples a ``resolution``² image with (the backbone's ``flow_schedule``:
    Qwen-Image's resolution-dependent shift; None = the pipeline's default size);
    DDPM-type schedulers give :class:`DDIMSampler` with η = ``eta`` (default 1.0, ddpo-pytorch).
    """
    scheduler = getattr(backbone_or_scheduler, "scheduler", backbone_or_scheduler)
    if "FlowMatch" in type(scheduler).__name__:
        schedule = getattr(backbone_or_scheduler, "flow_schedule", None)
        extra = schedule(num_steps, resolution, resolution) if schedule is not None else {}
        return FlowSDESampler.from_scheduler(scheduler, num_steps=num_steps,
                                             noise_level=0.7 if eta is None else eta, reduction=reduction,
                                             sde_type=sde_type, sde_window=sde_window, **extra)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise TypeError(f"no sampler for {type(scheduler).__name__}: need a flow-matching or DDPM-type scheduler")
    if sde_type != "sde" or sde_window is not None:
        raise ValueError(f"sde_type {sde_type!r} / sde_window are options of the flow SDE sampler (flow-matching "
                         f"models such as SD3), not of {type(scheduler).__name__}'s DDIM sampler")
    return DDIMSampler.from_scheduler(scheduler, num_steps=num_steps, eta=1.0 if eta is None else eta,
                                      reduction=reduction)


# ---------------------------------------------------------------------------------------- guidance
def uses_cfg(guidance_scale: float, backbone=None) -> bool:
    """The pipelines' rule: classifier-free guidance runs when ``guidance_scale > 1``, except on a
    guidance-distilled ``backbone`` (``embeds_guidance``: FLUX.1-dev), whose ``guidance_scale`` is the
    denoiser's guidance-embedding input."""
    return guidance_scale > 1.0 and not getattr(backbone, "embeds_guidance", False)


def guided_prediction(backbone, x: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                      uncond: Conditioning | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
    """The denoiser output with classifier-free guidance: ``u + w (c − u)``, fp32 ``[B, C, h, w]``.

    With CFG (``guidance_scale > 1``) the denoiser runs once on ``[x; x]`` with ``[uncond; cond]``, as
    diffusers pipelines batch it; otherwise once on ``x`` with ``cond``. ``timesteps`` is ``[B]``.
    ``x`` is cast to the backbone's dtype. Gradients flow to trainable weights. A guidance-distilled
    backbone (``embeds_guidance``) runs once, with ``guidance_scale`` as its guidance input.
    """
    x_in = x.to(backbone.dtype)
    timesteps = timesteps.to(x.device)
    if getattr(backbone, "embeds_guidance", False):
        return backbone.predict(x_in, timesteps, cond, guidance=guidance_scale).float()
    if not uses_cfg(guidance_scale):
        return backbone.predict(x_in, timesteps, cond).float()
    if uncond is None:
        raise ValueError(f"guidance_scale {guidance_scale} > 1 needs the unconditional conditioning (uncond)")
    if uncond.time_ids is None and cond.time_ids is not None:  # the pipeline's negative size defaults
        uncond = dataclasses.replace(uncond, time_ids=cond.time_ids)
    out = backbone.predict(torch.cat([x_in, x_in]), torch.cat([timesteps, timesteps]),
                           Conditioning.cat([uncond, cond]))
    u, c = out.float().chunk(2)
    combine = getattr(backbone, "combine_guidance", None)  # the family's rule (Qwen-Image rescales the norm)
    return combine(u, c, guidance_scale) if combine is not None else u + guidance_scale * (c - u)


# ---------------------------------------------------------------------------------------- trajectories
@dataclass
class Trajectory:
    """A batch of sampled trajectories: everything needed to rescore any of its transitions later.

    Attributes:
        latents: ``[B, T+1, C, h, w]`` fp32; ``latents[:, 0]`` is the initial noise, ``latents[:, i+1]``
            the result of step ``i``, ``latents[:, -1]`` the sample (decode with
            ``backbone.decode_latents(traj.final)``).
        timesteps: ``[T]`` the denoiser's timestep at each step (``sampler.timesteps``).
        log_probs: ``[B, T]`` log p(x_{i+1} | x_i) under the sampling policy, ``sampler.reduction``.
        cond: ``[B]`` the prompt conditioning.
        uncond: ``[B]`` the CFG negative conditioning (None without CFG).
        guidance_scale: CFG weight ``w`` used at every step.
        sampler: the sampler (schedule, η / noise level, reduction).
        means: ``[B, T, C, h, w]`` the sampling policy's transition means μ_old (GRPO-Guard's RatioNorm),
            recorded only with ``sample_trajectory(..., record_means=True)``; None otherwise.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    cond: Conditioning
    uncond: Conditioning | None
    guidance_scale: float
    sampler: Sampler
    means: torch.Tensor | None = None

    @property
    def eta(self) -> float:
        """DDIM η or flow noise level ``a`` of the sampler."""
        return self.sampler.eta

    @property
    def final(self) -> torch.Tensor:
        """``[B, C, h, w]`` the sampled latents."""
        return self.latents[:, -1]

    @property
    def num_steps(self) -> int:
        return self.latents.shape[1] - 1

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index) -> Trajectory:
        """The trajectories selected along the batch (an int keeps the batch dim)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return dataclasses.replace(self, latents=self.latents[index], log_probs=self.log_probs[index],
                                   cond=self.cond[index], uncond=None if self.uncond is None else self.uncond[index],
                                   means=None if self.means is None else self.means[index])

    def to(self, device: torch.device | str) -> Trajectory:
        """A copy with every tensor on ``device`` (e.g. park a rollout buffer on the CPU)."""
        uncond = None if self.uncond is None else self.uncond.to(device)
        return dataclasses.replace(self, latents=self.latents.to(device), log_probs=self.log_probs.to(device),
                                   cond=self.cond.to(device), uncond=uncond,
                                   means=None if self.means is None else self.means.to(device))

    @staticmethod
    def cat(items: Sequence[Trajectory]) -> Trajectory:
        """Concatenate along the batch (same sampler and guidance)."""
        first = items[0]
        return dataclasses.replace(first, latents=torch.cat([t.latents for t in items]),
                                   log_probs=torch.cat([t.log_probs for t in items]),
                                   cond=Conditioning.cat([t.cond for t in items]),
                                   uncond=None if first.uncond is None else Conditioning.cat([t.uncond for t in items]),
                                   means=None if first.means is None else torch.cat([t.means for t in items]))


def initial_latents(backbone, sampler: Sampler, batch_size: int, *, generator=None, height: int | None = None,
                    width: int | None = None) -> torch.Tensor:
    """``[B, C, H/f, W/f]`` initial noise drawn as the pipelines draw it: ``randn_tensor`` with the
    generator (one or a list, one per sample) in the backbone's dtype, times ``init_noise_sigma``;
    returned in fp32. ``height``/``width`` default to the pipeline's default image size."""
    from diffusers.utils.torch_utils import randn_tensor

    pipe, raw = backbone.pipeline, backbone.raw_denoiser
    f = pipe.vae_scale_factor
    default = (getattr(pipe, "default_sample_size", None) or raw.config.sample_size) * f
    height, width = height or default, width or default
    channels = getattr(backbone, "latent_channels", None) or raw.config.in_channels  # unpacked (Qwen-Image)
    shape = (batch_size, channels, int(height) // f, int(width) // f)
    noise = randn_tensor(shape, generator=generator, device=backbone.device, dtype=backbone.dtype)
    return (noise * sampler.init_noise_sigma).float()


def draw_step_noise(sampler: Sampler, x: torch.Tensor, generator, dtype: torch.dtype) -> torch.Tensor | None:
    """The step's standard normal noise, drawn like diffusers' DDIM step (``randn_tensor`` in the model
    dtype); None for a deterministic sampler (nothing drawn, the generator is left as is)."""
    from diffusers.utils.torch_utils import randn_tensor

    if sampler.eta == 0:
        return None
    return randn_tensor(tuple(x.shape), generator=generator, device=x.device, dtype=dtype).float()


def step_prediction(backbone, sampler: Sampler, x: torch.Tensor, step_index: torch.Tensor | int,
                    cond: Conditioning, uncond: Conditioning | None = None, guidance_scale: float = 1.0, *,
                    checkpoint: bool = False) -> torch.Tensor:
    """:func:`guided_prediction` at sampler step(s) ``step_index`` (``[B]`` or one int): fp32
    ``[B, C, h, w]``. ``checkpoint`` wraps the denoiser call in ``torch.utils.checkpoint`` when
    gradients are on (activations recomputed in backward)."""
    if isinstance(step_index, int):
        step_index = torch.full((x.shape[0],), step_index, dtype=torch.long)
    t = sampler.timesteps[step_index.cpu()]
    if checkpoint and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint as ckpt

        return ckpt(guided_prediction, backbone, x, t, cond, uncond, guidance_scale, use_reentrant=False)
    return guided_prediction(backbone, x, t, cond, uncond, guidance_scale)


def denoise_step(backbone, sampler: Sampler, x: torch.Tensor, step_index: torch.Tensor | int, cond: Conditioning,
                 uncond: Conditioning | None = None, guidance_scale: float = 1.0, *,
                 prev_sample: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                 checkpoint: bool = False) -> StepOutput:
    """:func:`step_prediction` at ``x`` ``[B, C, h, w]`` then :meth:`Sampler.step`: the one step
    every sampling path (rollout, rescoring, backprop) goes through. ``step_index`` ``[B]`` may
    differ per sample."""
    pred = step_prediction(backbone, sampler, x, step_index, cond, uncond, guidance_scale, checkpoint=checkpoint)
    return sampler.step(pred, step_index, x, prev_sample=prev_sample, noise=noise)


def prepare_guidance(backbone, cond: Conditioning, uncond: Conditioning | None,
                     guidance_scale: float) -> Conditioning | None:
    """The negative conditioning to use: ``uncond`` as given, the pipeline's default negative
    (``backbone.negative_conditioning``) when CFG is on and none is given, None without CFG."""
    if not uses_cfg(guidance_scale, backbone):
        return None
    return uncond if uncond is not None else backbone.negative_conditioning(len(cond))


@torch.no_grad()
def sample_trajectory(backbone, sampler: Sampler, cond: Conditioning, *, uncond: Conditioning | None = None,
                      guidance_scale: float = 1.0, latents: torch.Tensor | None = None, generator=None,
                      height: int | None = None, width: int | None = None, record_means: bool = False) -> Trajectory:
    """Sample ``B = len(cond)`` trajectories and record every latent and transition log-prob.

    Args:
        backbone: a :class:`~diffalign.models.Backbone` (its current state is the sampling policy).
        sampler: from :func:`make_sampler`.
        cond: ``[B]`` prompt conditioning (``backbone.encode_prompt(prompts)``).
        uncond: ``[B]`` CFG negative; default ``backbone.negative_conditioning(B)`` (the pipeline's).
        guidance_scale: CFG weight; CFG runs when > 1.
        latents: ``[B, C, h, w]`` initial noise (e.g. shared by a D3PO pair); drawn with
            :func:`initial_latents` otherwise.
        generator: a ``torch.Generator`` (or one per sample) for the initial and per-step noise,
            consumed in the pipeline's order.
        record_means: also keep every transition mean μ (``traj.means [B, T, C, h, w]``).
    Returns:
        :class:`Trajectory` with ``latents [B, T+1, C, h, w]`` and ``log_probs [B, T]``.
    """
    uncond = prepare_guidance(backbone, cond, uncond, guidance_scale)
    if latents is None:
        latents = initial_latents(backbone, sampler, len(cond), generator=generator, height=height, width=width)
    x = latents.to(backbone.device, torch.float32)
    all_latents, all_log_probs, all_means = [x], [], []
    for i in range(sampler.num_steps):
        noise = draw_step_noise(sampler, x, generator, backbone.dtype)
        out = denoise_step(backbone, sampler, x, i, cond, uncond, guidance_scale, noise=noise)
        x = out.prev_sample
        all_latents.append(x)
        all_log_probs.append(out.log_prob)
        if record_means:
            all_means.append(out.mean)
    return Trajectory(torch.stack(all_latents, dim=1), sampler.timesteps.clone(), torch.stack(all_log_probs, dim=1),
                      cond, uncond, guidance_scale, sampler, torch.stack(all_means, dim=1) if record_means else None)


# ---------------------------------------------------------------------------------------- rescoring
@dataclass
class TransitionLogProbs:
    """Rescored transitions of ``b`` trajectories at ``K`` steps each (fp32).

    Attributes:
        log_prob: ``[b, K]`` log p(x_{j+1} | x_j) under the model that was active.
        mean: ``[b, K, C, h, w]`` the transition means μ (for KL terms, :func:`gaussian_kl`).
        std: ``[b, K]`` the transition standard deviations (the schedule's, model-independent).
        steps: ``[b, K]`` the step indices ``j`` scored.
    """

    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    steps: torch.Tensor


def _step_matrix(steps, batch_size: int, num_steps: int) -> torch.Tensor:
    """``[b, K]`` step indices: ints, slices, lists and ranges are shared by every trajectory; a tensor
    is per trajectory (``[b]`` or ``[b, K]``)."""
    if torch.is_tensor(steps):
        idx = steps.detach().cpu().long()
        idx = idx.unsqueeze(1) if idx.ndim == 1 else idx
    else:
        if steps is None:
            steps = slice(None)
        if isinstance(steps, slice):
            steps = range(num_steps)[steps]
        shared = torch.as_tensor([steps] if isinstance(steps, int) else list(steps), dtype=torch.long)
        idx = shared.unsqueeze(0).expand(batch_size, -1)
    if idx.ndim != 2 or idx.shape[0] != batch_size:
        raise ValueError(f"per-trajectory steps must be [b] or [b, K] with b = {batch_size}, got {tuple(idx.shape)}")
    idx = torch.where(idx < 0, idx + num_steps, idx)
    if idx.numel() and (idx.min() < 0 or idx.max() >= num_steps):
        raise IndexError(f"step indices must be in [0, {num_steps}), got {idx.min().item()}..{idx.max().item()}")
    return idx


def transition_log_probs(backbone, traj: Trajectory,
                         steps: int | slice | Sequence[int] | torch.Tensor | None = None) -> TransitionLogProbs:
    """Rescore stored transitions under the backbone's current model.

    The policy is the backbone as is (LoRA on); the reference is the same call inside
    ``with backbone.reference():`` (add ``torch.no_grad()`` there). Gradients flow to trainable
    weights through ``mean`` and ``log_prob``; the stored latents are constants.

    Args:
        traj: the trajectories to rescore (select a minibatch with ``traj[idx]``).
        steps: which transitions. An int, a slice, a list or a range of step indices: the same for
            every trajectory. A LongTensor: per trajectory, ``[b]`` (one step each, e.g. DDPO's
            per-sample shuffle) or ``[b, K]``. None: all ``T`` steps.
    Returns:
        :class:`TransitionLogProbs` with ``log_prob [b, K]``. Column ``k`` costs one batched denoiser
        call over the ``b`` trajectories (two halves with CFG). For the stored log-prob to be
        reproduced bit for bit, ``b`` must equal the rollout's batch size (module docstring).
        When backpropagating through many steps, call once per step to keep one step's graph.
    """
    idx = _step_matrix(steps, len(traj), traj.num_steps)
    rows = torch.arange(len(traj))
    log_probs, means, stds = [], [], []
    for k in range(idx.shape[1]):
        j = idx[:, k]
        x = traj.latents[rows, j]
        out = denoise_step(backbone, traj.sampler, x, j, traj.cond, traj.uncond, traj.guidance_scale,
                           prev_sample=traj.latents[rows, j + 1])
        log_probs.append(out.log_prob)
        means.append(out.mean)
        stds.append(out.std.flatten())
    return TransitionLogProbs(torch.stack(log_probs, 1), torch.stack(means, 1), torch.stack(stds, 1),
                              idx.to(traj.latents.device))
