"""Preference objectives beyond one hard label per pair: ranked lists (RankDPO) and smoothed
preferences (SmPO). Pure tensor functions, like :mod:`diffalign.objectives.preference`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def dcg_discounts(k: int, device=None) -> torch.Tensor:
    """DCG position discounts ``[k]``: ``1 / log2(1 + τ)`` for ranks ``τ = 1..k``."""
    tau = torch.arange(1, k + 1, dtype=torch.float32, device=device)
    return 1.0 / torch.log2(1.0 + tau)


def exponential_gains(relevance: torch.Tensor) -> torch.Tensor:
    """DCG gains ``G = 2^ψ − 1`` of relevances ``ψ`` (any shape)."""
    return torch.pow(2.0, relevance.float()) - 1.0


def delta_dcg_weights(gains: torch.Tensor) -> torch.Tensor:
    """RankDPO's pair weights ``[B, K, K]`` for lists in rank order (best first), ``gains`` ``[B, K]``:

    ``W_ij = |G_i − G_j| · |D_i − D_j|`` for ``i < j`` (``D`` = :func:`dcg_discounts`), 0 elsewhere:
    how much swapping items ``i`` and ``j`` would change the list's DCG.
    """
    b, k = gains.shape
    d = dcg_discounts(k, gains.device)
    w = (gains[:, :, None] - gains[:, None, :]).abs() * (d[:, None] - d[None, :]).abs()[None]
    return w * torch.ones(k, k, device=gains.device).triu(1)[None]


@dataclass
class RankedOutput:
    """Per-list losses ``[B]``; ``pair_logits`` ``[B, K, K]`` (``β·(r_i − r_j)``, used where ``i < j``);
    ``rewards`` ``[B, K]`` the implicit rewards ``β·(ℓθ − ℓref)``; ``weights`` ``[B, K, K]``."""

    losses: torch.Tensor
    pair_logits: torch.Tensor
    rewards: torch.Tensor
    weights: torch.Tensor

    def accuracy(self) -> torch.Tensor:
        """The weighted fraction of ordered pairs the implicit reward ranks correctly (ties count ½)."""
        z = self.pair_logits.detach()
        correct = (z > 0).float() + 0.5 * (z == 0).float()
        return (correct * self.weights).sum() / self.weights.sum().clamp_min(1e-12)


def ranked_dpo_loss(policy: torch.Tensor, ref: torch.Tensor, gains: torch.Tensor, *, beta: float,
                    normalize: bool = True) -> RankedOutput:
    """RankDPO (Karthik et al., 2024) on lists in rank order (best first).

    ``policy``, ``ref``: ``[B, K]`` log-likelihoods (ELBO surrogates) of the K items of each list;
    ``gains``: ``[B, K]`` DCG gains. With ``r = β·(ℓθ − ℓref)``::

        loss = Σ_{i<j} W_ij · −log σ(r_i − r_j)  /  Σ_{i<j} W_ij        (W: :func:`delta_dcg_weights`)

    ``normalize=False`` drops the division (the paper's sum). Normalised, a list of two is exactly the
    DPO loss, and the loss is ``ln 2`` while the policy equals the reference.
    """
    if policy.shape != ref.shape or policy.shape != gains.shape or policy.ndim != 2:
        raise ValueError(f"policy {tuple(policy.shape)}, ref {tuple(ref.shape)} and gains {tuple(gains.shape)} "
                         "must all be [B, K]")
    rewards = beta * (policy - ref)
    logits = rewards[:, :, None] - rewards[:, None, :]
    w = delta_dcg_weights(gains).to(logits.dtype)
    losses = (w * -F.logsigmoid(logits)).sum((1, 2))
    if normalize:
        losses = losses / w.sum((1, 2)).clamp_min(1e-12)
    return RankedOutput(losses, logits, rewards.detach(), w)


def smoothed_preference(score_chosen: torch.Tensor, score_rejected: torch.Tensor, *, score_min: float = 0.0,
                        score_max: float = 1.0) -> torch.Tensor:
    """SmPO's smoothed probability that the chosen item is preferred, ``[B]``:

    ``s̃ = (s − min)/(max − min)``, ``p = exp(s̃_w)/(exp(s̃_w) + exp(s̃_l)) = σ(s̃_w − s̃_l)``.
    """
    if score_max <= score_min:
        raise ValueError(f"score_max ({score_max}) must exceed score_min ({score_min})")
    span = score_max - score_min
    return torch.sigmoid((score_chosen.float() - score_rejected.float()) / span)


def smoothed_beta_scale(score_chosen: torch.Tensor, score_rejected: torch.Tensor, *, score_min: float = 0.0,
                        score_max: float = 1.0, scale: float = 10.0) -> torch.Tensor:
    """SmPO's per-pair factor on β, ``[B]``: ``scale·(2p − 1)`` with ``p`` = :func:`smoothed_preference`
    (the original code: ``10·(2p − 1)``). 0 for equal scores; negative when the scores prefer the
    rejected item."""
    p = smoothed_preference(score_chosen, score_rejected, score_min=score_min, score_max=score_max)
    return scale * (2 * p - 1)


__all__ = ["RankedOutput", "dcg_discounts", "delta_dcg_weights", "exponential_gains", "ranked_dpo_loss",
           "smoothed_beta_scale", "smoothed_preference"]
