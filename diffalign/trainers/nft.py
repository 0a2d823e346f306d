"""DiffusionNFT (Zheng et al., ICLR 2026, arXiv:2509.16117): negative-aware fine-tuning on the forward
process, CFG-free. Follows NVlabs/DiffusionNFT ``scripts/train_nft_sd3.py`` (snapshot ``24af555``).

Per epoch (:mod:`diffalign.trainers.forward_online`)::

    rollout   with the OLD policy θ_old: T = 10 ODE steps, CFG 1 (none); keep x0; rewards;
              A = (r − mean_prompt) / (std_epoch + 1e-4)                     (global_std)
    train     each sample at int(0.99·T) = 9 of the T grid steps, in its own random order:
              t = σ_j, fresh ε, x_t = (1 − t)·x0 + t·ε
              r = clip(clip(A, ±5)/5 · ½ + ½, 0, 1)                         optimality probability
              v⁺ = β·v_θ + (1 − β)·v_old,  v⁻ = (1 + β)·v_old − β·v_θ        (v_old: θ_old, no grad)
              L  = 5·[r·L⁺ + (1 − r)·L⁻]/β + β_KL·mean((v_θ − v_ref)²)        (v_ref: LoRA disabled)
              L^± = mean((x̂0^± − x0)²) / sg(mean|x̂0^± − x0|),  x̂0^± = x_t − t·v^±   (loss_form x0_adaptive)
    end       θ_old ← d·θ_old + (1 − d)·θ,  d = min(0.001·step, 0.5)          (old_decay linear)

(:func:`diffalign.objectives.forward_process.nft_loss`.) Two betas, kept apart as in the original's
``config.beta`` / ``config.train.beta``: ``beta`` is the guidance strength, ``kl_beta`` the KL weight.

At the start (θ_old = θ = the base model) ``v⁺ = v⁻ = v_old``: ``L⁺ = L⁻`` and the loss is
``5·L/β``; its gradient is ``5·(2r − 1)·∂L``, so a sample with ``r = ½`` (A = 0) pulls nowhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch

from diffalign.core.policy_copy import PolicyCopy
from diffalign.objectives.forward_process import NFT_LOSS_FORMS, nft_loss, nft_optimality
from diffalign.trainers.forward_online import ForwardProcessMethod, ForwardRolloutConfig, linear_decay
from diffalign.trainers.method import StepOutput, register_method
from diffalign.trainers.online import Micro, Rollout, trajectory_plan

OLD_DECAYS = ("linear", "delayed", "none")


@dataclass
class DiffusionNFTConfig(ForwardRolloutConfig):
    """DiffusionNFT; defaults from NVlabs/DiffusionNFT ``config/nft.py`` / ``config/base.py`` (SD3.5-M
    GenEval / PickScore configs) unless noted.

    Attributes:
        num_steps: rollout sampler steps ``T`` (10; the multi-reward config uses 25).
        eta: rollout noise level (0: deterministic; the original's ``dpm2`` solver is deterministic).
        guidance_scale: rollout CFG (1.0: CFG-free; training never uses CFG).
        images_per_prompt: group size (24).
        prompts_per_epoch: prompts per epoch and process (the original: 48 groups per epoch over all GPUs).
        advantage: ``group_global_std`` (``global_std=True``).
        adv_clip_max: advantages clipped to ±5; also the loss scale (the code multiplies by it).
        timestep_fraction: share of the ``T`` grid steps trained per sample (0.99 → 9 of 10).
        beta: guidance strength β of the implicit policies (1.0; 0.1 for OCR and multi-reward).
        kl_beta: weight of ``mean((v_θ − v_ref)²)`` to the base model (``train.beta`` = 1e-4; 0 skips
            the reference call).
        loss_form: ``x0_adaptive`` (as coded: x0-space error over its detached mean-abs) or
            ``velocity`` (the paper's ``‖v^± − u‖²``; the maintainers' internal ``normalized_loss=False``).
        old_decay: the old policy's EMA after each epoch: ``linear`` (``decay_type 1``: ``min(0.001·step,
            0.5)``), ``delayed`` (``decay_type 2``, OCR: 0 before step 75, then ``min(0.0075·(step − 75),
            0.999)``) or ``none`` (``decay_type 0``: the old policy is the current one at every epoch).
    """

    num_steps: int = 10
    eta: float | None = 0.0
    guidance_scale: float = 1.0
    images_per_prompt: int = 24
    prompts_per_epoch: int = 48
    advantage: str = "group_global_std"
    timestep_fraction: float = 0.99
    beta: float = 1.0
    kl_beta: float = 1.0e-4
    loss_form: str = "x0_adaptive"
    old_decay: str = "linear"


def old_policy_decay(kind: str, step: int) -> float:
    """DiffusionNFT's ``return_decay(step, decay_type)`` for ``old_decay`` ``kind``."""
    if kind == "linear":
        return linear_decay(step, 0.001, 0.5)
    if kind == "delayed":
        return 0.0 if step < 75 else min(0.0075 * (step - 75), 0.999)
    if kind == "none":
        return 0.0
    raise ValueError(f"unknown old_decay {kind!r}; choose from {OLD_DECAYS}")


@register_method("diffusion-nft", DiffusionNFTConfig, kind="online")
class DiffusionNFT(ForwardProcessMethod):
    """Negative-aware fine-tuning on clean rollout samples (module docstring)."""

    def __init__(self, config: DiffusionNFTConfig, backbone):
        if config.loss_form not in NFT_LOSS_FORMS:
            raise ValueError(f"unknown loss_form {config.loss_form!r}; choose from {NFT_LOSS_FORMS}")
        old_policy_decay(config.old_decay, 0)
        super().__init__(config, backbone)
        self.old: PolicyCopy | None = None
        self.run = None

    def prepare(self, run) -> None:
        self.run = run
        self.old = PolicyCopy(self.backbone)  # θ_old = θ at the start

    def rollout_policy(self, run) -> contextlib.AbstractContextManager:
        return self.old.active()  # the original samples with the "old" adapter

    def plan(self, rollout: Rollout, run, generator: torch.Generator) -> list[list[Micro]]:
        cfg = run.recipe.train
        return trajectory_plan(self.num_units(rollout), cfg.batch_size, cfg.gradient_accumulation_steps,
                               torch.arange(self.sampler.num_steps), self.config.timestep_fraction, generator)

    def loss(self, rollout: Rollout, micro: Micro) -> StepOutput:
        cfg = self.config
        batch = self.noised(self.run, rollout, micro, tag="nft-noise")
        v_old = self.copy_velocity(self.old, batch)
        v_ref = self.reference_velocity(batch) if cfg.kl_beta > 0 else None
        v = self.velocity(batch)
        r = nft_optimality(batch.advantages, cfg.adv_clip_max)
        losses, l_pos, l_neg = nft_loss(v, v_old, batch.x_t, batch.x0, batch.target, batch.sigma, r,
                                        beta=cfg.beta, form=cfg.loss_form, scale=cfg.adv_clip_max)
        policy_loss = losses.mean()
        metrics = {"policy_loss": policy_loss.detach(), "loss_positive": l_pos.detach().mean(),
                   "loss_negative": l_neg.detach().mean(), "optimality_mean": r.mean(),
                   "old_velocity_gap": (v.detach() - v_old).pow(2).mean()}
        loss = policy_loss
        if v_ref is not None:
            kl = (v - v_ref).pow(2).flatten(1).mean(1).mean()
            loss = loss + cfg.kl_beta * kl
            metrics["kl"] = kl.detach()
        return StepOutput(loss, metrics)

    def end_epoch(self, run, epoch: int) -> None:
        self.old.update(old_policy_decay(self.config.old_decay, run.global_step))

    def save_state(self, folder: Path) -> None:
        self.old.save(folder / "nft_old_policy.safetensors")

    def load_state(self, folder: Path) -> None:
        self.old.load(folder / "nft_old_policy.safetensors")
