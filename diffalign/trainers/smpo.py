"""SmPO-Diffusion (Lu et al., ICML 2025): smoothed preferences from reward scores, ReNoise inversion."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.core.likelihood import elbo_loglik
from diffalign.objectives import dpo_loss
from diffalign.objectives.ranked import smoothed_beta_scale
from diffalign.trainers.method import (
    Method,
    StepOutput,
    TrainBatch,
    dpo_metrics,
    register_method,
    weighted_mean,
)

PICKSCORE_MIN, PICKSCORE_MAX = 0.11543526, 0.28201571  # the original's normalisation of PickScore/100


@dataclass
class SmPOConfig:
    """SmPO.

    Attributes:
        beta: DPO strength on ``ℓ = −½L`` (5000 SDXL / 2000 SD1.5 in the original).
        score_min, score_max: the scores are mapped to ``s̃ = (s − min)/(max − min)`` before the
            softmax. The original uses PickScore/100 with min 0.11543526, max 0.28201571; the default
            (0, 1) suits ``diffalign data label`` scores (averages of z-scores).
        scale: the per-pair factor on β is ``scale·(2p − 1)``, ``p = σ(s̃_w − s̃_l)`` (10 in the original).
        num_inversion_steps: DDIM inversion grid (10 for SDXL, 5 for SD1.5 in the original).
        renoise_steps: ReNoise passes per inversion step (1 in the original: the mean of two predictions).
        eta: extra inversion noise (0 in the original).
        invert_with: ``"policy"`` (the original) or ``"reference"``.
    """

    beta: float = 5000.0
    score_min: float = 0.0
    score_max: float = 1.0
    scale: float = 10.0
    num_inversion_steps: int = 10
    renoise_steps: int = 1
    eta: float = 0.0
    invert_with: str = "policy"

    def __post_init__(self):
        if self.invert_with not in ("policy", "reference"):
            raise ValueError(f"invert_with must be 'policy' or 'reference', not {self.invert_with!r}")
        if self.score_max <= self.score_min:
            raise ValueError(f"score_max ({self.score_max}) must exceed score_min ({self.score_min})")


@register_method("smpo", SmPOConfig, kind="offline")
class SmPO(Method):
    """InPO-style pairs (ReNoise inversion, re-parametrised target) with β scaled per pair by the
    smoothed preference of the two images' reward scores::

        loss = −log σ(β·κ·((ℓθw − ℓrw) − (ℓθl − ℓrl))),   κ = scale·(2σ(s̃_w − s̃_l) − 1)

    The scores, not the label order, decide the direction: a pair whose scores favour the "rejected"
    image gets κ < 0. Needs ``score_0``/``score_1`` (Pick-a-Pic parquet, as ``diffalign data label``
    writes) or ``score_chosen``/``score_rejected`` (JSONL).
    """

    def loss(self, batch: TrainBatch) -> StepOutput:
        c = self.config
        if batch.scores is None or bool(torch.isnan(batch.scores).any()):
            raise ValueError("SmPO needs a reward score for both images of every pair: Pick-a-Pic columns "
                             "score_0/score_1 (written by 'diffalign data label'), or JSONL fields "
                             "score_chosen/score_rejected")
        sw, sl = batch.scores.chunk(2)
        kappa = smoothed_beta_scale(sw, sl, score_min=c.score_min, score_max=c.score_max, scale=c.scale)
        batch = self.invert_batch(batch, model=c.invert_with, num_steps=c.num_inversion_steps, eta=c.eta,
                                  renoise_steps=c.renoise_steps)
        policy_errors, ref_errors = self.errors(batch), self.errors(batch, reference=True)
        pw, pl = elbo_loglik(policy_errors).chunk(2)
        rw, rl = elbo_loglik(ref_errors).chunk(2)
        out = dpo_loss(pw, pl, rw, rl, beta=c.beta, beta_per_pair=c.beta * kappa.to(pw))
        metrics = dpo_metrics(out.logits, out.chosen_rewards, out.rejected_rewards, policy_errors, ref_errors)
        metrics["beta_scale"] = kappa.mean()
        return StepOutput(weighted_mean(out.losses, batch.weights), metrics)
