"""Preference objectives: pure tensor functions, no model code.

Inputs are log-likelihoods (or their surrogates) of chosen ("w") and rejected ("l") samples under the
policy and the reference, each ``[B]``. The diffusion side passes the ELBO surrogate
``ℓ = −½·L`` (:func:`diffalign.core.likelihood.elbo_loglik`); the text side passes sequence log-probs.
Every function returns per-pair losses ``[B]`` (the caller reduces, so per-pair weights compose) and
the logits it used, for metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PreferenceOutput:
    """Per-pair losses ``[B]``; ``logits`` ``[B]`` is the preference logit (``> 0`` means the policy
    prefers the chosen sample more than the reference does); rewards are the implicit rewards
    ``β·(ℓθ − ℓref)`` of chosen and rejected."""

    losses: torch.Tensor
    logits: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def loss_terms(loss_type: str | list[str], loss_weights: list[float] | None = None) -> list[tuple[str, float]]:
    """``loss_type`` (one name or a list, as TRL's) with ``loss_weights`` (default all 1) as
    ``[(name, weight), ...]``; names are :data:`DPO_LOSS_TYPES` or ``sft``."""
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = loss_weights or [1.0] * len(types)
    if len(weights) != len(types):
        raise ValueError(f"loss_weights {weights} must match loss_type {types}")
    for t in types:
        if t not in (*DPO_LOSS_TYPES, "sft"):
            raise ValueError(f"unknown loss type {t!r}; choose from {(*DPO_LOSS_TYPES, 'sft')}")
    return list(zip(types, weights))


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    beta_per_pair: torch.Tensor | None = None,
) -> PreferenceOutput:
    """DPO and its variants on log-likelihood ratios.

    ``h = (ℓθw − ℓrw) − (ℓθl − ℓrl)`` and ``z = β·h``:

    * ``sigmoid`` (DPO): ``−(1−ε)·log σ(z) − ε·log σ(−z)`` (ε = ``label_smoothing``: conservative DPO).
      With ``ℓ = −½L`` and β = 5000 this is the official Diffusion-DPO loss
      ``−log σ(−½β((Lθw−Lθl)−(Lrw−Lrl)))``.
    * ``robust`` (Chowdhury et al.): ``((1−ε)·(−log σ(z)) − ε·(−log σ(−z))) / (1−2ε)``; needs ε < ½.
    * ``ipo``: ``(h − 1/(2β))²``.
    * ``hinge`` (SLiC): ``relu(1 − z)``.

    ``beta_per_pair`` ``[B]`` replaces ``beta`` per pair (SmPO's smoothed scale).
    """
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    b = beta if beta_per_pair is None else beta_per_pair
    z = b * h
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    elif loss_type == "robust":
        if not 0 <= label_smoothing < 0.5:
            raise ValueError("robust DPO needs 0 <= label_smoothing < 0.5")
        losses = (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * b)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - z)
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}; choose from {DPO_LOSS_TYPES}")
    return PreferenceOutput(
        losses=losses,
        logits=z,
        chosen_rewards=(b * (policy_chosen - ref_chosen)).detach(),
        rejected_rewards=(b * (policy_rejected - ref_rejected)).detach(),
    )


def kto_loss(
    policy: torch.Tensor,
    ref: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    kl_reference_point: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO on single samples with binary feedback (Diffusion-KTO's form).

    ``r = ℓθ − ℓref`` is the implicit reward of each sample ``[B]``; ``desirable`` ``[B]`` is bool.
    The reference point ``z0 = max(mean(r), 0)`` (detached; pass ``kl_reference_point`` to use one
    gathered across processes). Loss per sample: ``λ_y·(1 − σ(s·β·(r − z0)))`` with ``s = +1`` for
    desirable and ``−1`` for undesirable samples.

    Returns ``(losses [B], z0)``.
    """
    r = policy - ref
    if kl_reference_point is None:
        kl_reference_point = r.detach().mean().clamp_min(0)
    sign = desirable.to(r.dtype) * 2 - 1
    weight = torch.where(desirable.bool(), desirable_weight, undesirable_weight).to(r.dtype)
    losses = weight * (1 - torch.sigmoid(sign * beta * (r - kl_reference_point)))
    return losses, kl_reference_point


def simpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> PreferenceOutput:
    """SimPO (Meng et al., 2024): reference-free, on *length-normalised* log-likelihoods ``[B]``
    (the text side passes mean per-token log-probs).

    ``z = β·(ℓw − ℓl) − γ``; loss ``−(1−ε)·log σ(z) − ε·log σ(−z)``. Rewards are ``β·ℓ``. (TRL's
    ``CPOTrainer(loss_type="simpo")`` with ``simpo_gamma = γ`` computes the same ``z``.)
    """
    z = beta * (policy_chosen - policy_rejected) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return PreferenceOutput(losses=losses, logits=z, chosen_rewards=(beta * policy_chosen).detach(),
                            rejected_rewards=(beta * policy_rejected).detach())


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, stable on both sides of ``−ln 2`` (clamped just below 0)."""
    x = x.clamp_max(-1e-7)
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
) -> PreferenceOutput:
    """ORPO (Hong et al., 2024): reference-free, on *mean per-token* log-likelihoods ``[B]`` (≤ 0).

    ``log odds(y) = ℓ − log(1 − e^ℓ)``; ``z = log odds(y_w) − log odds(y_l)``; per pair
    ``−ℓw − β·log σ(z)`` (the NLL of the chosen sample plus λ = β times the odds-ratio term).
    Rewards are ``β·log odds``.
    """
    odds_w = policy_chosen - log1mexp(policy_chosen)
    odds_l = policy_rejected - log1mexp(policy_rejected)
    z = odds_w - odds_l
    losses = -policy_chosen - beta * F.logsigmoid(z)
    return PreferenceOutput(losses=losses, logits=z, chosen_rewards=(beta * odds_w).detach(),
                            rejected_rewards=(beta * odds_l).detach())


def mapo_odds(error: torch.Tensor, snr_value: float = 0.5) -> torch.Tensor:
    """MaPO's decreasing transform of a per-sample error: ``f(L) = sL / (exp(sL) − 1)`` (``f(0) = 1``)."""
    x = snr_value * error
    return torch.where(x.abs() < 1e-6, 1 - x / 2, x / torch.expm1(x))


def mapo_loss(
    error_chosen: torch.Tensor,
    error_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    snr_value: float = 0.5,
    num_train_timesteps: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MaPO (reference-free, margin-aware), as the original code computes it, per pair:

    ``L_w − β·log σ(T·(f(L_w) − f(L_l)))`` with ``f`` = :func:`mapo_odds` and ``T`` the number of training
    timesteps. Takes per-sample denoising errors ``[B]`` (not log-likelihoods). Returns
    ``(losses [B], margin logits [B])``.
    """
    logits = num_train_timesteps * (mapo_odds(error_chosen, snr_value) - mapo_odds(error_rejected, snr_value))
    return error_chosen - beta * F.logsigmoid(logits), logits


def sft_loss(error_chosen: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning on the chosen sample: its denoising error ``[B]``."""
    return error_chosen
