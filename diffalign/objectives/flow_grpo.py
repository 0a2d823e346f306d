"""Pure loss pieces of the flow-SDE GRPO variants: GRPO-Guard's RatioNorm and per-step gradient
reweighting (arXiv 2510.22319; ``zhtmike/flow_grpo@9745241: scripts/train_sd3_GRPO_Guard.py``). Inputs are
per-transition log-probs, means and standard deviations of the flow SDE sampler
(:mod:`diffalign.core.sampling`); no model code.

For a stored transition ``x' = μ_old + s z`` and the policy's mean ``μ_θ`` (``Δμ = μ_θ − μ_old``), the
Gaussian log-ratio is ``log π_θ − log π_old = R[z Δμ]/s − R[Δμ²]/(2s²)``: its second term is always
negative (the mean of the ratio is below 1) and its scale follows the step's noise level ``s``.
RatioNorm removes the first and cancels the second::

    log ρ̃ = (log π_θ − log π_old + R[(μ_θ − μ_old)²] / (2 s²)) · s          (= R[z Δμ])
    L     = max(−A ρ̃, −A clip(ρ̃, 1 ± ε)) / |dt|                              (gradient reweighting)

``R`` is the sampler's reduction (mean over latent dims, as coded).
"""

from __future__ import annotations

import torch

from diffalign.objectives.online import ppo_clip_loss


def _per_sample(std: torch.Tensor) -> torch.Tensor:
    return std.float().reshape(std.shape[0], -1)[:, 0]


def ratio_norm_log_ratio(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor,
                         old_mean: torch.Tensor, std: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio ``(log π_θ − log π_old + R[(μ_θ − μ_old)²]/(2s²))·s``, ``[b]``.

    Args:
        log_prob, old_log_prob: ``[b]`` the transition's Gaussian log-prob (``sde`` sampler) under the
            policy and at sampling time.
        mean, old_mean: ``[b, C, h, w]`` the transition means ``μ_θ`` (with grad) and ``μ_old`` (stored).
        std: ``[b]`` or ``[b, 1, 1, 1]`` the step's standard deviation ``s = g·√(−dt)``, per sample.
        reduction: ``mean`` or ``sum`` over latent dims (the sampler's).

    The bias is reduced per sample (the coded version reduces a 1-D tensor over the whole batch,
    flow_grpo issue #244, maintainer-confirmed) and ``s`` is per sample (the code averages it over the
    batch, #223: equal when a micro-batch shares one step).
    """
    s = _per_sample(std)
    if bool((s <= 0).any()):
        raise ValueError("RatioNorm needs stochastic transitions (std > 0): deterministic steps carry no ratio")
    sq = (mean.float() - old_mean.float()) ** 2
    dims = tuple(range(1, sq.ndim))
    reduced = sq.mean(dim=dims) if reduction == "mean" else sq.sum(dim=dims)
    bias = reduced / (2 * s**2)
    return (log_prob.float() - old_log_prob.float() + bias) * s


def grpo_guard_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, mean: torch.Tensor, old_mean: torch.Tensor,
                    std: torch.Tensor, dt: torch.Tensor, advantages: torch.Tensor, clip_range: float,
                    adv_clip_max: float = 5.0, *, ratio_norm: bool = True, reweight: bool = True,
                    reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO-Guard's per-transition loss ``max(−A ρ̃, −A clip(ρ̃, 1±ε)) / |dt|`` (module docstring).

    Args:
        log_prob, old_log_prob, mean, old_mean, std: as :func:`ratio_norm_log_ratio`.
        dt: ``[b]`` the step's ``σ_{i+1} − σ_i`` (< 0), per sample.
        advantages: ``[b]``, clipped to ``±adv_clip_max``.
        ratio_norm: use RatioNorm's ratio (False: the plain ``exp(log π_θ − log π_old)``).
        reweight: divide each transition's loss by ``|dt|`` (the code's ``/ mean(√(−dt))²``).
    Returns:
        ``(losses [b], ratio [b])``.
    """
    if ratio_norm:
        log_ratio = ratio_norm_log_ratio(log_prob, old_log_prob, mean, old_mean, std, reduction)
        losses, ratio = ppo_clip_loss(log_ratio, torch.zeros_like(log_ratio), advantages, clip_range, adv_clip_max)
    else:
        losses, ratio = ppo_clip_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max)
    if reweight:
        losses = losses / dt.float().abs().reshape(-1).to(losses.device)
    return losses, ratio


__all__ = ["grpo_guard_loss", "ratio_norm_log_ratio"]
