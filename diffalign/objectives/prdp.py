"""PRDP's reward difference prediction (Deng et al., CVPR 2024, arXiv 2402.08714) as a pure tensor function.

The model's implicit reward of a trajectory ``x̄ = (x_0, …, x_T)`` is its log-ratio to the reference,
``r̂_θ(x̄) = mean_t [log π_θ(x_{t+1}|x_t, c) − log π_ref(x_{t+1}|x_t, c)]`` (a mean over the trained steps, as
the paper's Jax listing, appendix G). For two trajectories ``a, b`` of one prompt, the model should predict
their reward difference scaled by the KL weight ``β``::

    D_ab  = r̂_θ(x̄^a) − r̂_θ(x̄^b)                 R_ab = r(x^a) − r(x^b)
    ℓ_ab  = (D_ab − R_ab / β)²

and the proximal (clipped) form clips every per-step log-ratio to ``old ± ε`` (``old``: the sampling
policy's log-ratio) before the mean, and keeps the larger of the two losses::

    r̂c(x̄) = mean_t clip(log π_θ − log π_ref, (log π_old − log π_ref) − ε, (log π_old − log π_ref) + ε)
    L = mean_{pairs (a, b) of a group with R_ab > 0} max((D_ab − R_ab/β)², (Dc_ab − R_ab/β)²)

Zero loss on every pair ⇔ π_θ ∝ π_ref · exp(r/β), the maximiser of ``E[r] − β·KL(π_θ ‖ π_ref)`` (the paper's
theorem). With the policy equal to the sampling policy and the reference (the first update of a LoRA at
zero), ``D = 0`` and ``L = mean (R/β)²``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RDPOutput:
    """Per pair ``(a, b)`` with ``R_ab > 0``, ``[P]`` each.

    Attributes:
        losses: ``max((D − R/β)², (Dc − R/β)²)``.
        predicted: ``D_ab`` (unclipped).
        target: ``R_ab / β``.
        clipped_frac: share of the per-step log-ratios that the clip changed (a scalar tensor).
    """

    losses: torch.Tensor
    predicted: torch.Tensor
    target: torch.Tensor
    clipped_frac: torch.Tensor


def reward_difference_loss(log_ratio: torch.Tensor, old_log_ratio: torch.Tensor, rewards: torch.Tensor, *,
                           group_size: int, beta: float, clip_range: float) -> RDPOutput:
    """PRDP's clipped reward-difference regression (module docstring).

    Args:
        log_ratio: ``[N, K]`` per-step ``log π_θ − log π_ref`` of ``N`` trajectories at ``K`` trained steps,
            laid out as consecutive groups of ``group_size`` (one prompt each, the same steps within a group).
        old_log_ratio: ``[N, K]`` the same for the sampling policy ``π_old`` (constants).
        rewards: ``[N]`` the rewards of the trajectories' images.
        beta: KL weight ``β`` (> 0).
        clip_range: stepwise clip ``ε`` (>= 0).
    Returns:
        :class:`RDPOutput` over the ordered in-group pairs with ``R_ab > 0`` (ties carry no pair).
    """
    if log_ratio.ndim != 2 or old_log_ratio.shape != log_ratio.shape:
        raise ValueError(f"log_ratio {tuple(log_ratio.shape)} and old_log_ratio {tuple(old_log_ratio.shape)} "
                         "must both be [N, K]")
    n = log_ratio.shape[0]
    if rewards.shape != (n,) or n % group_size:
        raise ValueError(f"rewards {tuple(rewards.shape)} must be [N] with N = {n} a multiple of group_size "
                         f"{group_size}")
    if beta <= 0 or clip_range < 0:
        raise ValueError(f"beta must be > 0 and clip_range >= 0, got {beta}, {clip_range}")
    old = old_log_ratio.detach().to(log_ratio)
    hi, lo = old + clip_range, old - clip_range
    # torch.where, not clamp / maximum: a value on a bound (or a tie of the two losses) keeps its full gradient
    clipped = torch.where(log_ratio > hi, hi, torch.where(log_ratio < lo, lo, log_ratio))
    lr = log_ratio.float().mean(dim=1).view(-1, group_size)          # [G, B]
    lrc = clipped.float().mean(dim=1).view(-1, group_size)
    r = rewards.detach().float().to(lr.device).view(-1, group_size)
    D = lr[:, :, None] - lr[:, None, :]                               # [G, B, B]: D[g, a, b] = r̂(a) − r̂(b)
    Dc = lrc[:, :, None] - lrc[:, None, :]
    target = (r[:, :, None] - r[:, None, :]) / beta
    mask = target > 0
    unclipped_loss, clipped_loss = (D - target) ** 2, (Dc - target) ** 2
    losses = torch.where(clipped_loss > unclipped_loss, clipped_loss, unclipped_loss)[mask]
    frac = (clipped.detach() != log_ratio.detach()).float().mean()
    return RDPOutput(losses, D[mask], target[mask], frac)


__all__ = ["RDPOutput", "reward_difference_loss"]
