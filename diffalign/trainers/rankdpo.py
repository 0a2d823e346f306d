"""RankDPO (Karthik et al., 2024): DCG-weighted pairwise DPO over ranked lists of images per prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffalign.core.likelihood import elbo_loglik
from diffalign.objectives.ranked import exponential_gains, ranked_dpo_loss
from diffalign.trainers.method import (
    Method,
    StepOutput,
    TrainBatch,
    register_method,
    weighted_mean,
)

GAINS = ("scores", "ranks")


@dataclass
class RankDPOConfig:
    """RankDPO.

    Attributes:
        beta: DPO strength on ``ℓ = −½L`` (Diffusion-DPO's 5000 for ε-prediction SD1.5/SDXL).
        gain: DCG gain ``G = 2^ψ − 1`` of each image with relevance ψ = its combined reward score
            (``"scores"``, the paper) or ψ = ``K − τ`` from its rank τ alone (``"ranks"``).
        normalize: divide each list's weighted loss by its total pair weight, so a list of two is
            exactly DPO and β transfers from Diffusion-DPO (the paper sums).
    """

    beta: float = 5000.0
    gain: str = "scores"
    normalize: bool = True

    def __post_init__(self):
        if self.gain not in GAINS:
            raise ValueError(f"gain must be one of {GAINS}, not {self.gain!r}")


@register_method("rankdpo", RankDPOConfig, kind="offline")
class RankDPO(Method):
    """Each prompt's ``K`` images (best first, sharing noise and timestep) get implicit rewards
    ``r_i = β(ℓθ_i − ℓref_i)``; every ordered pair ``i < j`` contributes ``−log σ(r_i − r_j)``
    weighted by ``ΔDCG_ij = |G_i − G_j|·|1/log2(1+i) − 1/log2(1+j)|``. Data: ``data.format: ranked``
    (``diffalign data label --format ranked``)."""

    data_kind = "ranked"

    def loss(self, batch: TrainBatch) -> StepOutput:
        c = self.config
        b = batch.weights.shape[0]
        policy_errors, ref_errors = self.errors(batch), self.errors(batch, reference=True)

        def lists(v: torch.Tensor) -> torch.Tensor:  # rows [K·B] rank-major -> [B, K]
            return v.reshape(-1, b).T

        k = policy_errors.shape[0] // b
        if c.gain == "scores":
            if batch.scores is None or bool(torch.isnan(batch.scores).any()):
                raise ValueError("RankDPO gain='scores' needs each image's score (ranked lists from "
                                 "'diffalign data label --format ranked'); or use gain='ranks'")
            gains = exponential_gains(lists(batch.scores))
        else:
            gains = exponential_gains((k - 1 - torch.arange(k, device=policy_errors.device)).float()).expand(b, k)
        out = ranked_dpo_loss(elbo_loglik(lists(policy_errors)), elbo_loglik(lists(ref_errors)), gains.to(policy_errors),
                              beta=c.beta, normalize=c.normalize)
        rewards = out.rewards
        metrics = {
            "implicit_acc": out.accuracy(),
            "reward_margin": (rewards[:, 0] - rewards[:, -1]).mean(),  # best minus worst
            "reward_best": rewards[:, 0].mean(),
            "reward_worst": rewards[:, -1].mean(),
            "model_mse": policy_errors.detach().mean(),
            "ref_mse": ref_errors.detach().mean(),
        }
        return StepOutput(weighted_mean(out.losses, batch.weights), metrics)
