"""DGPO, Direct Group Preference Optimization (Luo et al., ICLR 2026, arXiv:2510.08425): a group-level
DPO on the clean samples of a deterministic (ODE) rollout. Follows Luo-Yihong/DGPO
``scripts/train_sd3_dgpo.py`` (``compute_group_dgpo_loss_allreduce`` and the training loop) and
``config/dgpo.py`` (snapshot ``01ceb4b``).

Per epoch (:mod:`diffalign.trainers.forward_online`)::

    rollout   T = 10 ODE steps, CFG 4.5, with the policy (after ``switch_ema_ref`` steps: the EMA copy);
              keep x0; rewards; per-prompt advantages
    train     M = 4 steps drawn without replacement from [0, trunc_steps] once per inner epoch (shared
              by every minibatch); minibatches of whole groups; per (minibatch, step): t = σ_j, one ε
              per group, x_t = (1 − t)·x0 + t·ε, u = ε − x0
              ℓ_θ = mean((u − v_θ)²),  ℓ_ref = mean((u − v_ref)²)   (v_ref: LoRA disabled, no CFG)
              PPO-style clip (clip_dsm): ρ = exp(ℓ_ema − ℓ_θ); ℓ_θ detached where A > 0 and ρ > 1 + ε
              or A < 0 and ρ < 1 − ε   (v_ema: the fast EMA copy)
              s_g = (β/G)·Σ_{i∈g} A_i·(ℓ_θ,i − ℓ_ref,i)   (detached)
              L   = mean_i(σ(s_{g(i)})·A_i·ℓ_θ,i) + β_KL·mean((v_θ − v_ref)²)
    step      θ_ema ← d·θ_ema + (1 − d)·θ,  d = min(0.3, 0.001·step), after every optimizer step

(:func:`diffalign.objectives.forward_process.dgpo_loss`.) The coded loss has the gradient of the group
DPO loss ``−log σ(−s_g)`` up to a positive per-group factor; that loss is logged as
``group_dpo_loss`` and is ``ln 2`` at the start (policy = reference: ``s_g = 0``, weights ``½``).

An optimizer step accumulates ``train.gradient_accumulation_steps`` (minibatch, step) micro-batches,
as the original's ``accelerator.accumulate`` counts each of them. A group's ``s_g`` needs all its
members: a minibatch holds whole groups (``train.batch_size`` a multiple of ``images_per_prompt``),
so the original's all-reduce of the per-group sums over GPUs is not needed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from diffalign.core.policy_copy import PolicyCopy
from diffalign.core.positions import stable_seed
from diffalign.objectives.forward_process import dgpo_loss
from diffalign.trainers.forward_online import (
    ForwardProcessMethod,
    ForwardRolloutConfig,
    linear_decay,
    shared_step_plan,
)
from diffalign.trainers.method import StepOutput, register_method
from diffalign.trainers.online import Micro, Rollout


@dataclass
class DGPOConfig(ForwardRolloutConfig):
    """DGPO; defaults from Luo-Yihong/DGPO ``config/dgpo.py`` (``geneval_sd3_4gpu``, the
    ``compressibility`` base it extends) unless noted.

    Attributes:
        num_steps: rollout ODE steps (10; evaluation uses 14).
        eta: rollout noise level (0: ``noise_level 0``; the original's DPM-Solver is replaced by Euler).
        guidance_scale: rollout CFG (4.5, "mode 1"; training and the reference never use CFG).
        images_per_prompt: group size ``G`` (16; "24 for better performance").
        prompts_per_epoch: per process (the original: 8 groups per epoch over 4 GPUs).
        advantage: ``group`` (GenEval ``global_std False``; OCR uses ``group_global_std``).
        beta: β_dpo of the group sum (100 in the base and OCR configs; the GenEval config sets 101;
            PickScore 10).
        kl_beta: weight of ``mean((v_θ − v_ref)²)`` (``train.beta`` 0.02; PickScore 1e-3; 0 skips it
            unless the reference is needed for ``s_g`` anyway).
        num_train_timesteps: ``M`` steps trained per inner epoch (4).
        trunc_steps: the M steps are drawn from ``[0, trunc_steps]`` (4 GenEval, 6 OCR: ``t_min =
            shift(0.3)``).
        shared_noise: one ε per group at each step (``use_shared_noise True``).
        clip_dsm: the PPO-style clip of ``ℓ_θ`` against the EMA copy (True).
        clip_range: its ε (1e-2; 5e-2 in the base config).
        switch_ema_ref: after this many optimizer steps the rollouts come from the EMA copy (500
            GenEval, 200 base/OCR); None = never.
        use_ema_ref: use the EMA copy instead of the base model as the reference in ``s_g`` (False;
            the README's dynamic-EMA-reference recipe, with β 2000).
    """

    num_steps: int = 10
    eta: float | None = 0.0
    guidance_scale: float = 4.5
    images_per_prompt: int = 16
    prompts_per_epoch: int = 8
    advantage: str = "group"
    beta: float = 100.0
    kl_beta: float = 0.02
    num_train_timesteps: int = 4
    trunc_steps: int = 4
    shared_noise: bool = True
    clip_dsm: bool = True
    clip_range: float = 1.0e-2
    switch_ema_ref: int | None = 500
    use_ema_ref: bool = False


@register_method("dgpo", DGPOConfig, kind="online")
class DGPO(ForwardProcessMethod):
    """Group-level DPO on clean ODE samples (module docstring)."""

    def __init__(self, config: DGPOConfig, backbone):
        if not 1 <= config.num_train_timesteps <= config.trunc_steps + 1:
            raise ValueError(f"num_train_timesteps must be in [1, trunc_steps + 1 = {config.trunc_steps + 1}], "
                             f"got {config.num_train_timesteps}")
        if config.trunc_steps >= config.num_steps:
            raise ValueError(f"trunc_steps must be < num_steps ({config.num_steps}), got {config.trunc_steps}")
        if config.images_per_prompt < 2:
            raise ValueError("DGPO needs images_per_prompt >= 2 (a group to compare within)")
        super().__init__(config, backbone)
        self.ema: PolicyCopy | None = None
        self.run = None

    def prepare(self, run) -> None:
        self.run = run
        g = self.config.images_per_prompt
        if run.recipe.train.batch_size % g:
            raise ValueError(f"dgpo: train.batch_size ({run.recipe.train.batch_size}) must be a multiple of "
                             f"images_per_prompt ({g}): a group's preference needs all its members in one batch")
        if self.needs_ema:
            self.ema = PolicyCopy(self.backbone)

    @property
    def needs_ema(self) -> bool:
        cfg = self.config
        return cfg.clip_dsm or cfg.use_ema_ref or cfg.switch_ema_ref is not None

    def rollout_policy(self, run) -> contextlib.AbstractContextManager:
        switch = self.config.switch_ema_ref
        if switch is not None and run.global_step >= switch:
            return self.ema.active()
        return contextlib.nullcontext()

    def plan(self, rollout: Rollout, run, generator: torch.Generator) -> list[list[Micro]]:
        cfg, train = self.config, run.recipe.train
        # the M steps of this inner epoch: one draw, shared by every minibatch (and process)
        shared = torch.Generator().manual_seed(stable_seed(train.seed, "dgpo-steps", run.epoch,
                                                           int(rollout.extra.setdefault("plans", 0))))
        rollout.extra["plans"] += 1
        steps = torch.randperm(cfg.trunc_steps + 1, generator=shared)[:cfg.num_train_timesteps]
        return shared_step_plan(self.num_units(rollout), train.batch_size, train.gradient_accumulation_steps,
                                lambda g: steps, generator, group_size=cfg.images_per_prompt,
                                micros_per_step=train.gradient_accumulation_steps)

    def loss(self, rollout: Rollout, micro: Micro) -> StepOutput:
        cfg = self.config
        g = cfg.images_per_prompt
        batch = self.noised(self.run, rollout, micro, tag="dgpo-noise", group_size=g if cfg.shared_noise else None)
        v_ref = self.reference_velocity(batch)
        v_ema = self.copy_velocity(self.ema, batch) if (cfg.clip_dsm or cfg.use_ema_ref) else None
        v = self.velocity(batch)
        adv = batch.advantages.float().clamp(-cfg.adv_clip_max, cfg.adv_clip_max)
        target = batch.target.float()
        errors = (target - v).pow(2).flatten(1).mean(1)
        ref_errors = (target - v_ref).pow(2).flatten(1).mean(1)
        metrics = {}
        if v_ema is not None:
            ema_errors = (target - v_ema).pow(2).flatten(1).mean(1)
            ratio = torch.exp(ema_errors - errors.detach())
            clip = torch.where(adv > 0, ratio > 1 + cfg.clip_range, ratio < 1 - cfg.clip_range)
            if cfg.clip_dsm:
                errors = torch.where(clip, errors.detach(), errors)
            metrics["clipfrac"] = clip.float().mean()
            metrics["ratio_max_dev"] = (ratio - 1).abs().max()
        # group index of each sample within the micro-batch (whole groups, in order)
        _, groups = torch.unique(micro.units.cpu() // g, return_inverse=True)
        losses, s, group_dpo = dgpo_loss(errors, ema_errors if cfg.use_ema_ref else ref_errors, adv, groups,
                                         beta=cfg.beta, group_size=g)
        policy_loss = losses.mean()
        metrics.update({"policy_loss": policy_loss.detach(), "group_dpo_loss": group_dpo.mean(),
                        "group_weight_mean": torch.sigmoid(s).mean(), "dsm_loss": errors.detach().mean(),
                        "ref_dsm_loss": ref_errors.mean()})
        loss = policy_loss
        if cfg.kl_beta > 0:
            kl = (v - v_ref).pow(2).flatten(1).mean(1).mean()
            loss = loss + cfg.kl_beta * kl
            metrics["kl"] = kl.detach()
        return StepOutput(loss, metrics)

    def after_step(self, run) -> None:
        if self.ema is not None:  # the original's decay uses the step count before this step
            self.ema.update(linear_decay(run.global_step - 1, 0.001, 0.3))

    def save_state(self, folder: Path) -> None:
        if self.ema is not None:
            self.ema.save(folder / "dgpo_ema_ref.safetensors")

    def load_state(self, folder: Path) -> None:
        if self.ema is not None:
            self.ema.load(folder / "dgpo_ema_ref.safetensors")
