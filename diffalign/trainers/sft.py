"""Supervised fine-tuning on the chosen images (the usual baseline and warm start)."""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.objectives import sft_loss
from diffalign.trainers.method import (
    Method,
    StepOutput,
    TrainBatch,
    register_method,
    weighted_mean,
)


@dataclass
class SFTConfig:
    """SFT on the winner of each pair: the plain denoising loss. No knobs."""


@register_method("sft", SFTConfig, kind="offline")
class SFT(Method):
    data_kind = "chosen"
    uses_reference = False

    def loss(self, batch: TrainBatch) -> StepOutput:
        errors = self.errors(batch)
        return StepOutput(weighted_mean(sft_loss(errors), batch.weights), {"model_mse": errors.detach().mean()})
