"""What a training method is: a config dataclass and a loss on an encoded, noised batch.

The shared loop (:mod:`diffalign.trainers.loop`) owns data, encoding, noise, optimisation, logging
and checkpoints. A method owns only its loss. Methods never import each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from diffalign.core.likelihood import denoising_error
from diffalign.models.base import Conditioning


@dataclass
class TrainBatch:
    """One micro-batch, encoded and noised by the loop.

    For pair methods rows are laid out ``[winners (B), losers (B)]``; the two rows of a pair share
    ``noise`` and ``timesteps``. For single-sample methods (KTO, SFT) rows are independent.

    * ``latents``, ``noise``, ``x_t``, ``target``: ``[N, C, h, w]`` (``N = 2B`` for pairs)
    * ``timesteps``: ``[N]`` as the denoiser takes them
    * ``cond``: conditioning of the ``N`` rows
    * ``weights``: ``[B]`` per-pair (or per-sample) loss weights
    * ``desirable``: ``[B]`` bool, per-sample feedback (KTO only)
    """

    latents: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditioning
    weights: torch.Tensor
    desirable: torch.Tensor | None = None


@dataclass
class StepOutput:
    """A method's loss (scalar, weighted mean over the batch) and the metrics it logs (floats)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """Base class: subclasses set ``name``, ``config_class``, ``data_kind`` and implement ``loss``."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    data_kind: ClassVar[str] = "pairs"  # "pairs" | "feedback" | "chosen"
    uses_reference: ClassVar[bool] = True

    def __init__(self, config, backbone):
        self.config = config
        self.backbone = backbone

    def loss(self, batch: TrainBatch) -> StepOutput:
        raise NotImplementedError

    def errors(self, batch: TrainBatch, *, reference: bool = False) -> torch.Tensor:
        """Per-row denoising errors ``[N]`` of the policy (or, without gradients, the reference)."""
        if not reference:
            return denoising_error(self.backbone.predict(batch.x_t, batch.timesteps, batch.cond), batch.target)
        with torch.no_grad(), self.backbone.reference():
            return denoising_error(self.backbone.predict(batch.x_t, batch.timesteps, batch.cond), batch.target)


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ w·loss / Σ w`` over the batch."""
    weights = weights.to(losses)
    return (losses * weights).sum() / weights.sum().clamp_min(1e-12)
