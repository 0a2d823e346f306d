"""Diffusion-DPO (Wallace et al., 2023) on the shared likelihood core."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.core.likelihood import elbo_loglik
from diffalign.objectives import dpo_loss, loss_terms
from diffalign.trainers.method import (
    Method,
    StepOutput,
    TrainBatch,
    dpo_metrics,
    register_method,
    weighted_mean,
)


@dataclass
class DiffusionDPOConfig:
    """Diffusion-DPO.

    Attributes:
        beta: KL strength on the ELBO surrogate ``ℓ = −½L``. 5000 as in the official Diffusion-DPO
            code for ε-prediction SD1.5/SDXL (= 2500 in diffusers' SD1.5 script, which drops the ½);
            flow-matching (SD3) recipes use ~100–2000 (flow_grpo's Flow-DPO uses 100).
        loss_type: one name or a list, combined with ``loss_weights`` (as TRL's ``loss_type`` list):
            ``sigmoid`` (DPO), ``ipo``, ``hinge``, ``robust``, and ``sft`` (the winner's denoising error,
            the regulariser several papers add).
        loss_weights: weight of each entry of ``loss_type`` (default all 1).
        label_smoothing: conservative DPO (``sigmoid``) / robust DPO noise rate ε.
    """

    beta: float = 5000.0
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0

    def terms(self) -> list[tuple[str, float]]:
        return loss_terms(self.loss_type, self.loss_weights)


def diffusion_dpo_loss(
    policy_errors: torch.Tensor,
    ref_errors: torch.Tensor,
    weights: torch.Tensor,
    config: DiffusionDPOConfig,
) -> StepOutput:
    """Diffusion-DPO on per-sample denoising errors ``[2B]`` (winners first, then losers).

    ``loss = −log σ(−½β((Lθw − Lθl) − (Lrw − Lrl)))`` (and the other terms of ``config.loss_type``).
    """
    policy_w, policy_l = elbo_loglik(policy_errors).chunk(2)
    ref_w, ref_l = elbo_loglik(ref_errors).chunk(2)
    total = policy_errors.new_zeros(())
    out = None
    for loss_type, w in config.terms():
        if loss_type == "sft":
            term = policy_errors.chunk(2)[0]
        else:
            out = dpo_loss(policy_w, policy_l, ref_w, ref_l, beta=config.beta, loss_type=loss_type,
                           label_smoothing=config.label_smoothing)
            term = out.losses
        total = total + w * weighted_mean(term, weights)
    if out is None:  # metrics need the DPO logit even when only "sft" is trained
        out = dpo_loss(policy_w, policy_l, ref_w, ref_l, beta=config.beta)
    return StepOutput(total, dpo_metrics(out.logits, out.chosen_rewards, out.rejected_rewards, policy_errors, ref_errors))


@register_method("diffusion-dpo", DiffusionDPOConfig, kind="offline")
class DiffusionDPO(Method):
    def loss(self, batch: TrainBatch) -> StepOutput:
        return diffusion_dpo_loss(self.errors(batch), self.errors(batch, reference=True), batch.weights, self.config)
