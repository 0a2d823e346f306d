"""MaPO: margin-aware preference optimisation, reference-free (Hong et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.objectives import mapo_loss
from diffalign.trainers.method import (
    Method,
    StepOutput,
    TrainBatch,
    register_method,
    weighted_mean,
)


@dataclass
class MaPOConfig:
    """MaPO.

    Attributes:
        beta: weight of the margin term (``beta_mapo = 0.1`` in the original code).
        snr_value: ``s`` in the odds transform ``f(L) = sL/(exp(sL) − 1)`` (0.5 in the original).
    """

    beta: float = 0.1
    snr_value: float = 0.5


@register_method("mapo", MaPOConfig, kind="offline")
class MaPO(Method):
    """``L_w − β·log σ(T·(f(L_w) − f(L_l)))``: no reference model, no second forward pass."""

    uses_reference = False

    def loss(self, batch: TrainBatch) -> StepOutput:
        errors = self.errors(batch)
        ew, el = errors.chunk(2)
        T = getattr(self.backbone.forward_process, "num_train_timesteps", 1000)
        losses, logits = mapo_loss(ew, el, beta=self.config.beta, snr_value=self.config.snr_value, num_train_timesteps=T)
        logits = logits.detach()
        return StepOutput(
            weighted_mean(losses, batch.weights),
            {
                "implicit_acc": (logits > 0).float().mean() + 0.5 * (logits == 0).float().mean(),
                "margin": logits.mean(),
                "model_mse_chosen": ew.detach().mean(),
                "model_mse_rejected": el.detach().mean(),
            },
        )
