"""Diffusion-DPO (Wallace et al., 2023) on the shared likelihood core. Its loss,
:func:`~diffalign.trainers.method.diffusion_dpo_loss`, lives with the shared method helpers, as PPD uses it too."""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.objectives import loss_terms
from diffalign.trainers.method import (
    Method,
    StepOutput,
    TrainBatch,
    diffusion_dpo_loss,
    register_method,
)

__all__ = ["DiffusionDPO", "DiffusionDPOConfig", "diffusion_dpo_loss"]


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


@register_method("diffusion-dpo", DiffusionDPOConfig, kind="offline")
class DiffusionDPO(Method):
    def loss(self, batch: TrainBatch) -> StepOutput:
        return diffusion_dpo_loss(self.errors(batch), self.errors(batch, reference=True), batch.weights, self.config)
