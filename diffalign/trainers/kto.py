"""Diffusion-KTO: per-image binary feedback, no pairs (Li et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.core.likelihood import elbo_loglik
from diffalign.objectives import kto_loss
from diffalign.trainers.method import (
    Method,
    StepOutput,
    TrainBatch,
    register_method,
    weighted_mean,
)


@dataclass
class DiffusionKTOConfig:
    """Diffusion-KTO.

    Attributes:
        beta: scale on the implicit reward ``ℓθ − ℓref`` with ``ℓ = −½L``. 2000 here equals the original
            code's ``beta_dpo = 1000``, which applies β to ``Lref − Lθ`` (no ½).
        desirable_weight, undesirable_weight: λ_D, λ_U (1 and 1 in the original). The original also
            samples 80 % desirable images (``positive_ratio 0.8``); from preference pairs (half desirable)
            ``undesirable_weight = 0.25`` gives the same expected gradient.
        paired_noise: with preference-pair data, keep each pair's winner (desirable) and loser
            (undesirable) in the same batch on the same noise and timestep, and count ``batch_size`` in
            pairs. Each image's loss is unchanged; the pair's shared noise cancels out of the difference
            of their gradients (common random numbers), which is where the labels' signal is. The
            original shuffles the images apart (``False``); per-image feedback data ignores this. On the
            Shapes world only the paired form beat its flipped-label control (README).
    """

    beta: float = 2000.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    paired_noise: bool = False


@register_method("kto", DiffusionKTOConfig, kind="offline")
class DiffusionKTO(Method):

    @property
    def data_kind(self) -> str:
        return "feedback-pairs" if self.config.paired_noise else "feedback"

    def loss(self, batch: TrainBatch) -> StepOutput:
        policy, ref = elbo_loglik(self.errors(batch)), elbo_loglik(self.errors(batch, reference=True))
        losses, z0 = kto_loss(
            policy, ref, batch.desirable, beta=self.config.beta,
            desirable_weight=self.config.desirable_weight, undesirable_weight=self.config.undesirable_weight,
        )
        r = (policy - ref).detach() * self.config.beta
        d = batch.desirable.bool().to(r.dtype)
        # the same keys on every process and step (they are gathered): empty groups count as 0
        metrics = {
            "kl_reference_point": z0.detach(),
            "reward_desirable": (r * d).sum() / d.sum().clamp_min(1),
            "reward_undesirable": (r * (1 - d)).sum() / (1 - d).sum().clamp_min(1),
            "fraction_desirable": d.mean(),
        }
        return StepOutput(weighted_mean(losses, batch.weights), metrics)
