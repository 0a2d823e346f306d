"""AWM, Advantage Weighted Matching (Xue et al., arXiv:2509.25050): the pretraining flow-matching loss on
the policy's own clean samples, weighted by their advantages. Follows scxue/advantage_weighted_matching
``scripts/train_sd3_awm.py`` (``compute_log_prob_awm`` and the training loop; snapshot ``be51372``).

Per epoch (:mod:`diffalign.trainers.forward_online`)::

    rollout   T = 14 steps with the current policy, CFG 1; keep x0; rewards; group advantages (global std)
    train     per minibatch, 6 steps drawn one per stratum of the indices [1, int(0.9·T)) = [1, 12),
              shared by the minibatch; per step: t = σ_j, fresh ε, x_t = (1 − t)·x0 + t·ε
              mse = mean((v_θ(x_t) − (ε − x0))²)  (fp64),   ℓ = −w(t, mse)   (weighting ghuber, p = 0.25)
              L   = mean(max(−Â·ρ, −Â·clip(ρ, 1 ± ε))),  ρ = exp(ℓ − sg(ℓ)) = 1,  Â = clip(A, ±5)/5
                    + β_KL·mean((v_θ − v_ref)²) + β_EMA·mean((v_θ − v_ema)²)
    end       θ_ema ← d·θ_ema + (1 − d)·θ,  d = min(0.3, 0.001·step)        (ema_decay linear)

(:func:`~diffalign.objectives.forward_process.awm_log_likelihood`, :func:`~diffalign.objectives.forward_process.awm_loss`.)
On-policy (the original's ``off_policy=False``) the ratio is exactly 1, the loss value is ``−mean(Â)``
and its gradient is ``mean(Â·∇w(t, mse))``: advantage-weighted flow matching. At the start the EMA
copy and the reference equal the policy, so both KL terms are 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffalign.core.policy_copy import PolicyCopy
from diffalign.objectives.forward_process import AWM_WEIGHTINGS, awm_log_likelihood, awm_loss
from diffalign.trainers.forward_online import (
    ForwardProcessMethod,
    ForwardRolloutConfig,
    linear_decay,
    shared_step_plan,
)
from diffalign.trainers.method import StepOutput, register_method
from diffalign.trainers.online import Micro, Rollout

EMA_DECAYS = ("linear", "constant")


@dataclass
class AWMConfig(ForwardRolloutConfig):
    """AWM; defaults from scxue/advantage_weighted_matching ``config/dgx_awm.py`` (SD3.5-M GenEval,
    ``*_no_cfg`` configs) unless noted.

    Attributes:
        num_steps: rollout steps ``T`` (14).
        eta: rollout noise level (0, the ODE; the original's SA-Solver uses ``noise_level`` 0.4, 0 for
            PickScore: a different stochastic solver, not reproduced).
        guidance_scale: rollout CFG (1.0).
        images_per_prompt: group size (24).
        advantage: ``group_global_std`` (``global_std True``).
        adv_clip_max, advantage_max: ``Â = clip(A, ±adv_clip_max)·advantage_max/adv_clip_max`` (5, 1).
        num_train_timesteps: steps trained per minibatch, one per stratum (6).
        timestep_fraction: the strata cover the step indices ``[1, int(fraction·T))`` (0.9).
        weighting: ``ghuber`` (default), ``uniform``, ``t``, ``t2`` or ``huber`` (``w(t, mse)``).
        ghuber_power: ``p`` of ``ghuber`` (0.25).
        clip_range: PPO ratio clip ε (1.0: inactive, the ratio is 1 on-policy).
        kl_beta: weight of ``mean((v_θ − v_ref)²)`` to the base model (1e-3 GenEval; 3e-3 OCR, 1e-4
            PickScore; 0 skips the reference call).
        ema_kl_beta: weight of ``mean((v_θ − v_ema)²)`` to the EMA copy (``ema_beta`` 1; 0 skips it).
        ema_decay: ``linear`` (``d = min(0.3, 0.001·step)``, the default ``kl_ema_decay``) or
            ``constant`` (0.3), applied after each epoch.
    """

    num_steps: int = 14
    eta: float | None = 0.0
    guidance_scale: float = 1.0
    images_per_prompt: int = 24
    advantage: str = "group_global_std"
    advantage_max: float = 1.0
    num_train_timesteps: int = 6
    timestep_fraction: float = 0.9
    weighting: str = "ghuber"
    ghuber_power: float = 0.25
    clip_range: float = 1.0
    kl_beta: float = 1.0e-3
    ema_kl_beta: float = 1.0
    ema_decay: str = "linear"


def stratified_steps(num_steps: int, fraction: float, k: int, generator: torch.Generator) -> torch.Tensor:
    """``[k]`` step indices, one drawn uniformly in each of ``k`` strata of ``[1, int(fraction·T))``
    (AWM's ``discrete_wo_init``: the first, pure-noise step is never trained). The strata are
    ``array_split``-like: the first ones take the remainder."""
    candidates = torch.arange(1, int(num_steps * fraction))
    if len(candidates) < k:
        raise ValueError(f"num_train_timesteps {k} > the {len(candidates)} steps in [1, int({fraction}·{num_steps}))")
    return torch.stack([s[torch.randint(len(s), (1,), generator=generator)][0]
                        for s in torch.tensor_split(candidates, k)])


@register_method("awm", AWMConfig, kind="online")
class AWM(ForwardProcessMethod):
    """Advantage-weighted flow matching on clean rollout samples (module docstring)."""

    def __init__(self, config: AWMConfig, backbone):
        if config.weighting not in AWM_WEIGHTINGS:
            raise ValueError(f"unknown weighting {config.weighting!r}; choose from {AWM_WEIGHTINGS}")
        if config.ema_decay not in EMA_DECAYS:
            raise ValueError(f"unknown ema_decay {config.ema_decay!r}; choose from {EMA_DECAYS}")
        if config.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1, got {config.num_train_timesteps}")
        super().__init__(config, backbone)
        stratified_steps(config.num_steps, config.timestep_fraction, config.num_train_timesteps, torch.Generator())
        self.ema: PolicyCopy | None = None
        self.run = None

    def prepare(self, run) -> None:
        self.run = run
        if self.config.ema_kl_beta > 0:
            self.ema = PolicyCopy(self.backbone)

    def plan(self, rollout: Rollout, run, generator: torch.Generator) -> list[list[Micro]]:
        cfg, train = self.config, run.recipe.train
        return shared_step_plan(self.num_units(rollout), train.batch_size, train.gradient_accumulation_steps,
                                lambda g: stratified_steps(cfg.num_steps, cfg.timestep_fraction,
                                                           cfg.num_train_timesteps, g), generator)

    def loss(self, rollout: Rollout, micro: Micro) -> StepOutput:
        cfg = self.config
        batch = self.noised(self.run, rollout, micro, tag="awm-noise")
        v_ref = self.reference_velocity(batch) if cfg.kl_beta > 0 else None
        v_ema = self.copy_velocity(self.ema, batch) if self.ema is not None else None
        v = self.velocity(batch)
        mse = (v.double() - batch.target.double()).pow(2).flatten(1).mean(1)
        ell = awm_log_likelihood(mse, batch.sigma, cfg.weighting, cfg.ghuber_power)
        losses, ratio = awm_loss(ell, ell.detach(), batch.advantages, clip_range=cfg.clip_range,
                                 adv_clip_max=cfg.adv_clip_max, advantage_max=cfg.advantage_max)
        policy_loss = losses.mean().float()
        metrics = {"policy_loss": policy_loss.detach(), "mse": mse.detach().mean().float(),
                   "ratio_max_dev": (ratio.detach() - 1).abs().max().float()}
        loss = policy_loss
        if v_ref is not None:
            kl = (v - v_ref).pow(2).flatten(1).mean(1).mean()
            loss = loss + cfg.kl_beta * kl
            metrics["kl"] = kl.detach()
        if v_ema is not None:
            ema_kl = (v - v_ema).pow(2).flatten(1).mean(1).mean()
            loss = loss + cfg.ema_kl_beta * ema_kl
            metrics["ema_kl"] = ema_kl.detach()
        return StepOutput(loss, metrics)

    def end_epoch(self, run, epoch: int) -> None:
        if self.ema is not None:
            d = linear_decay(run.global_step, 0.001, 0.3) if self.config.ema_decay == "linear" else 0.3
            self.ema.update(d)

    def save_state(self, folder: Path) -> None:
        if self.ema is not None:
            self.ema.save(folder / "awm_ema.safetensors")

    def load_state(self, folder: Path) -> None:
        if self.ema is not None:
            self.ema.load(folder / "awm_ema.safetensors")
