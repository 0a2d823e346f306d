"""The shared engine piece of the forward-process on-line methods (DiffusionNFT, AWM, DGPO).

These methods sample with the policy (or an old / EMA copy of it), score the *clean* samples, and
train on them with the flow-matching forward process: no per-step log-prob, so the rollout may use
any sampler (the originals use DPM-2, SA-Solver or DPM-Solver; here the flow sampler of
:mod:`diffalign.core.sampling` with ``eta = 0``, i.e. the Euler ODE of the diffusers pipeline).

Per epoch::

    rollout   prompts × images_per_prompt samples x0 (no grad, CFG ``guidance_scale``), rewards,
              group advantages; only x0, the conditioning and the advantages are kept
    train     for a micro-batch of samples and a sampler step j each (the method's plan):
              t = σ_j (the rollout grid, as the originals: ``timesteps[j] / 1000``), fresh ε,
              x_t = (1 − t)·x0 + t·ε, target u = ε − x0; the method's loss on v_θ(x_t) (no CFG)

The noise of a micro-batch is a function of ``(train.seed, epoch, process, sample or group, step,
visit)``, so a resumed run (checkpoints at epoch ends) draws the same noise as an unbroken one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from diffalign.core.forward import FlowMatchingForward
from diffalign.core.positions import stable_seed
from diffalign.models.base import Conditioning
from diffalign.objectives.online import group_advantages
from diffalign.trainers.online import (
    Micro,
    OnlineMethod,
    Rollout,
    RolloutConfig,
    build_reward,
    gather_float,
    load_prompts,
)

FORWARD_ADVANTAGES = ("group", "group_global_std", "batch")


@dataclass
class ForwardRolloutConfig(RolloutConfig):
    """Rollout and reward knobs shared by DiffusionNFT, AWM and DGPO (each method's config overrides
    the defaults with its original's).

    Attributes:
        eta: noise level of the rollout sampler; 0 (default) = the deterministic ODE.
        reward: a registered reward name, or ``{name: weight}`` for a weighted mix (required).
        reward_options: loading keyword arguments per reward name.
        reward_normalize: how a mix normalises each reward (``batch``, ``card`` or None).
        images_per_prompt: group size ``G``.
        advantage: ``group`` (per-group mean and std), ``group_global_std`` (group mean, std of the
            whole epoch: Flow-GRPO's ``global_std``) or ``batch``.
        adv_eps: added to the std (1e-4, as flow_grpo's stat tracker).
        adv_clip_max: advantages are clipped to ``±adv_clip_max`` (5).
    """

    num_steps: int = 10
    eta: float | None = 0.0
    guidance_scale: float = 1.0
    reward: str | dict[str, float] = ""
    reward_options: dict[str, dict] = field(default_factory=dict)
    reward_normalize: str | None = "batch"
    images_per_prompt: int = 24
    advantage: str = "group_global_std"
    adv_eps: float = 1e-4
    adv_clip_max: float = 5.0


@dataclass
class Noised:
    """One micro-batch noised at its sampler steps: all ``[b, ...]``."""

    x0: torch.Tensor
    x_t: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor  # what the denoiser takes (1000·σ)
    sigma: torch.Tensor      # [b] σ in [0, 1]
    cond: Conditioning
    advantages: torch.Tensor


class ForwardProcessMethod(OnlineMethod):
    """Base of the forward-process methods: rollout of clean samples with rewards and advantages,
    noising at sampler steps, denoiser calls for the policy / reference / a :class:`PolicyCopy`."""

    trains_on_steps = False  # any sampler, ODE included

    def __init__(self, config: ForwardRolloutConfig, backbone):
        if config.advantage not in FORWARD_ADVANTAGES:
            raise ValueError(f"unknown advantage {config.advantage!r}; choose from {FORWARD_ADVANTAGES}")
        if config.advantage.startswith("group") and config.images_per_prompt < 2:
            raise ValueError(f"advantage {config.advantage!r} needs images_per_prompt >= 2")
        if not isinstance(backbone.forward_process, FlowMatchingForward):
            raise ValueError(f"{type(self).__name__} trains on the flow-matching forward process "
                             f"(x_t = (1 − t)·x0 + t·ε); this backbone's is {type(backbone.forward_process).__name__}")
        super().__init__(config, backbone)
        self.prompts = load_prompts(config.prompts, config.prompt_options)
        self.reward = build_reward(config.reward, config.reward_options, config.reward_normalize)
        self.reward.to(backbone.device)

    # ---- rollout
    def rollout_policy(self, run) -> contextlib.AbstractContextManager:
        """The weights the rollout samples with (default: the current policy)."""
        return contextlib.nullcontext()

    def rollout(self, run, epoch: int) -> Rollout:
        cfg, acc = self.config, run.accelerator
        g = cfg.images_per_prompt
        texts = [p for p in self.epoch_prompts(run, epoch, self.prompts) for _ in range(g)]
        with self.rollout_policy(run):
            traj = self.sample(run, texts, epoch)
        x0 = traj.final.clone()
        raw = self.reward.score(self.backbone.decode_latents(x0), texts).float().cpu()
        all_raw = gather_float(acc, raw)
        if cfg.advantage == "batch":
            adv = (all_raw - all_raw.mean()) / (all_raw.std(unbiased=False) + cfg.adv_eps)
        else:
            adv = group_advantages(all_raw, g, global_std=cfg.advantage == "group_global_std", eps=cfg.adv_eps)
        n, p = len(texts), acc.process_index
        metrics = {"reward_mean": float(all_raw.mean()), "reward_std": float(all_raw.std(unbiased=False)),
                   "advantage_abs_mean": float(adv.abs().mean())}
        return Rollout(None, texts, tensors={"x0": x0, "advantages": adv[p * n:(p + 1) * n].to(x0.device)},
                       metrics=metrics, extra={"cond": traj.cond, "epoch": epoch, "visits": {}})

    def num_units(self, rollout: Rollout) -> int:
        return len(rollout.tensors["x0"])

    # ---- noising
    def noised(self, run, rollout: Rollout, micro: Micro, *, tag: str, group_size: int | None = None) -> Noised:
        """The micro-batch's samples noised at their steps ``micro.steps`` (``[b]`` sampler indices):
        ``t = σ_j``, fresh ε per sample (or one ε per group of ``group_size`` consecutive samples of
        the rollout, DGPO's shared noise)."""
        units, steps = micro.units.cpu(), micro.steps.cpu()
        x0 = rollout.tensors["x0"][units.to(rollout.tensors["x0"].device)]
        keys = units if group_size is None else units // group_size
        visits: dict[tuple[int, int], int] = rollout.extra["visits"]
        seed, epoch, proc = run.recipe.train.seed, rollout.extra["epoch"], run.accelerator.process_index
        drawn: dict[tuple[int, int], torch.Tensor] = {}
        noise = []
        for key, step in zip(keys.tolist(), steps.tolist()):
            if (key, step) not in drawn:
                visit = visits.get((key, step), 0)
                visits[(key, step)] = visit + 1
                gen = torch.Generator().manual_seed(stable_seed(seed, tag, epoch, proc, key, step, visit))
                drawn[(key, step)] = torch.randn(x0.shape[1:], generator=gen)
            noise.append(drawn[(key, step)])
        noise = torch.stack(noise).to(x0)
        timesteps = self.sampler.timesteps[steps].to(x0.device)
        fp = self.backbone.forward_process
        return Noised(x0, fp.add_noise(x0, noise, timesteps), fp.target(x0, noise, timesteps), timesteps,
                      self.sampler.sigmas[steps].to(x0.device), rollout.extra["cond"][units.to(x0.device)],
                      rollout.tensors["advantages"][units.to(x0.device)])

    # ---- denoiser calls (no CFG in training, as every original)
    def velocity(self, batch: Noised) -> torch.Tensor:
        """``[b, C, h, w]`` v(x_t) of the backbone as it is now (fp32; gradients if enabled). A guidance-distilled
        backbone (FLUX.1-dev) is given the rollout's ``guidance_scale`` as its guidance input (one pass, not CFG)."""
        x_t = batch.x_t.to(self.backbone.dtype)
        if getattr(self.backbone, "embeds_guidance", False):
            return self.backbone.predict(x_t, batch.timesteps, batch.cond, guidance=self.config.guidance_scale).float()
        return self.backbone.predict(x_t, batch.timesteps, batch.cond).float()

    def reference_velocity(self, batch: Noised) -> torch.Tensor:
        """v_ref(x_t) of the reference (LoRA disabled / the frozen copy), no grad."""
        with torch.no_grad(), self.backbone.reference():
            return self.velocity(batch)

    def copy_velocity(self, copy, batch: Noised) -> torch.Tensor:
        """v(x_t) with a :class:`~diffalign.core.policy_copy.PolicyCopy`'s weights, no grad."""
        with torch.no_grad(), copy.active():
            return self.velocity(batch)


def linear_decay(step: int, rate: float, cap: float) -> float:
    """``min(rate·step, cap)``: the old / EMA copies' decay schedule of DiffusionNFT (0.001, 0.5), AWM and
    DGPO (0.001, 0.3)."""
    return min(rate * max(step, 0), cap)


def shared_step_plan(num_units: int, batch_size: int, grad_accum: int, draw, generator: torch.Generator, *,
                     group_size: int = 1, micros_per_step: int | None = None) -> list[list[Micro]]:
    """Minibatches of shuffled units (whole groups of ``group_size`` consecutive units when > 1), each
    trained at the steps ``draw(generator)`` gives it (``[K]``, shared by the minibatch): ``K``
    micro-batches per minibatch. Optimizer steps hold ``grad_accum`` minibatches (``micros_per_step``
    None) or ``micros_per_step`` consecutive micro-batches."""
    if num_units % group_size or batch_size % group_size:
        raise ValueError(f"{num_units} samples / train.batch_size {batch_size} must be whole groups of {group_size}")
    groups = torch.randperm(num_units // group_size, generator=generator)
    order = (groups[:, None] * group_size + torch.arange(group_size)).flatten()
    minibatches = list(order.split(batch_size))
    per_mb = [[Micro(mb, torch.full((len(mb),), int(j), dtype=torch.long)) for j in draw(generator)]
              for mb in minibatches]
    if micros_per_step is None:
        return [sum(per_mb[s:s + grad_accum], []) for s in range(0, len(per_mb), grad_accum)]
    flat: list[Micro] = sum(per_mb, [])
    return [flat[s:s + micros_per_step] for s in range(0, len(flat), micros_per_step)]


__all__ = ["ForwardProcessMethod", "ForwardRolloutConfig", "Noised", "linear_decay", "shared_step_plan"]
