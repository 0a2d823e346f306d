"""Forward-process on-line objectives as pure tensor functions: DiffusionNFT, AWM and DGPO.

All three train on *clean* rollout samples ``x0`` (any sampler, ODE included: no per-step log-prob),
noised again by the flow-matching forward process ``x_t = (1 − t)·x0 + t·ε``, target ``u = ε − x0``.
Inputs are velocities ``[b, ...]`` (the trained model ``v_θ``, a frozen old / EMA / reference model),
per-sample noise levels ``t`` ``[b]`` (σ in [0, 1]) and advantages ``[b]``; no model code.
``mean_dims`` is the mean over every non-batch dimension.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NFT_LOSS_FORMS = ("x0_adaptive", "velocity")
AWM_WEIGHTINGS = ("uniform", "t", "t2", "huber", "ghuber")


def _mean_dims(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like)


# ---------------------------------------------------------------------------------------- DiffusionNFT
def nft_optimality(advantages: torch.Tensor, adv_clip_max: float = 5.0) -> torch.Tensor:
    """DiffusionNFT's optimality probability ``r = clip(clip(A, ±m)/m · ½ + ½, 0, 1)`` ``[b]``
    (``m = adv_clip_max``: ``r = ½ + ½·clip(A/Z, −1, 1)`` with ``Z = m`` times the advantage's std)."""
    a = advantages.float().clamp(-adv_clip_max, adv_clip_max)
    return (a / adv_clip_max / 2 + 0.5).clamp(0.0, 1.0)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
             target: torch.Tensor, t: torch.Tensor, r: torch.Tensor, *, beta: float = 1.0,
             form: str = "x0_adaptive", scale: float = 5.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DiffusionNFT's negative-aware loss per sample (NVlabs/DiffusionNFT ``train_nft_sd3.py``).

    Implicit positive and negative policies from the trained and the old (rollout) velocity::

        v⁺ = β·v_θ + (1 − β)·sg(v_old),     v⁻ = (1 + β)·sg(v_old) − β·v_θ

    ``form="x0_adaptive"`` (as coded): ``x̂0^± = x_t − t·v^±`` and
    ``L^± = mean_dims((x̂0^± − x0)²) / sg(max(mean_dims|x̂0^± − x0|, 1e-5))`` (self-normalised weight,
    computed in fp64). ``form="velocity"`` (the paper's): ``L^± = mean_dims((v^± − u)²)``, ``u = target``.
    The loss is ``scale · [r·L⁺ + (1 − r)·L⁻] / β`` (the code's ``adv_clip_max · (...) / β``).

    At ``θ = θ_old`` both policies are ``v_old``: ``L⁺ = L⁻`` and the loss is ``scale·L/β`` whatever
    ``r``; its gradient is ``scale·(2r − 1)·∂L/∂v``, zero for ``r = ½``.

    Args:
        v_theta: ``[b, ...]`` trained velocity (with grad); v_old: ``[b, ...]`` old velocity (detached here).
        x_t, x0, target: ``[b, ...]`` noised latents, clean rollout latents, flow target ``ε − x0``.
        t: ``[b]`` noise levels σ; r: ``[b]`` optimality probabilities (:func:`nft_optimality`).
    Returns:
        ``(losses [b], L⁺ [b], L⁻ [b])``.
    """
    if form not in NFT_LOSS_FORMS:
        raise ValueError(f"unknown DiffusionNFT loss form {form!r}; choose from {NFT_LOSS_FORMS}")
    if beta <= 0:
        raise ValueError(f"beta (guidance strength) must be > 0, got {beta}")
    v_theta, v_old = v_theta.float(), v_old.detach().float()
    v_pos = beta * v_theta + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v_theta

    def part(v: torch.Tensor) -> torch.Tensor:
        if form == "velocity":
            return _mean_dims((v - target.float()) ** 2)
        err = x_t.float() - _expand(t, v) * v - x0.float()
        with torch.no_grad():
            weight = _mean_dims(err.double().abs()).clamp_min(1e-5)
        return _mean_dims(err**2) / weight.to(err)

    l_pos, l_neg = part(v_pos), part(v_neg)
    r = r.float().to(l_pos)
    return scale * (r * l_pos + (1 - r) * l_neg) / beta, l_pos, l_neg


# ---------------------------------------------------------------------------------------- AWM
def awm_log_likelihood(mse: torch.Tensor, t: torch.Tensor, weighting: str = "ghuber",
                       power: float = 0.25) -> torch.Tensor:
    """AWM's matching "log-likelihood" ``ℓ = −w(t, mse)`` of per-sample flow-matching errors ``[b]``
    (scxue/advantage_weighted_matching ``compute_log_prob_awm``), in fp64::

        uniform: −mse        t: −t·mse        t2: −t²·mse
        huber:   −t·(√(mse + 1e-10) − 1e-5)
        ghuber:  −t·((mse + 1e-10)^p − (1e-10)^p) / p        (p = ``power``, 0.25)
    """
    mse, t = mse.double(), t.double().to(mse.device)
    if weighting == "uniform":
        return -mse
    if weighting == "t":
        return -t * mse
    if weighting == "t2":
        return -(t**2) * mse
    if weighting == "huber":
        return -t * (torch.sqrt(mse + 1e-10) - 1e-5)
    if weighting == "ghuber":
        return -t * ((mse + 1e-10) ** power - 1e-10**power) / power
    raise ValueError(f"unknown AWM weighting {weighting!r}; choose from {AWM_WEIGHTINGS}")


def awm_loss(log_likelihood: torch.Tensor, old_log_likelihood: torch.Tensor, advantages: torch.Tensor, *,
             clip_range: float = 1.0, adv_clip_max: float = 5.0,
             advantage_max: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """AWM's policy loss per sample: the PPO form of advantage-weighted matching::

        Â = clip(A, ±adv_clip_max) · advantage_max / adv_clip_max
        ρ = exp(ℓ − ℓ_old),   L = max(−Â·ρ, −Â·clip(ρ, 1 ± ε))

    On-policy (``ℓ_old = sg(ℓ)``, the original's default) ``ρ = 1`` and ``L = −Â`` in value, with the
    gradient ``−Â·∇ℓ = Â·∇w(t, mse)``: the flow-matching loss weighted by the advantage.
    Returns ``(losses [b], ratio [b])``.
    """
    adv = advantages.double().clamp(-adv_clip_max, adv_clip_max) * (advantage_max / adv_clip_max)
    adv = adv.to(log_likelihood.device)
    ratio = torch.exp(log_likelihood.double() - old_log_likelihood.double())
    losses = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    return losses, ratio


# ---------------------------------------------------------------------------------------- DGPO
def dgpo_loss(policy_errors: torch.Tensor, ref_errors: torch.Tensor, advantages: torch.Tensor,
              groups: torch.Tensor, *, beta: float = 100.0, group_size: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DGPO's group preference loss per sample (Luo-Yihong/DGPO ``compute_group_dgpo_loss_allreduce``).

    With flow-matching errors ``ℓ = mean_dims((u − v)²)`` of the policy and the reference and the
    Diffusion-DPO surrogate ``β log π_θ/π_ref ≈ −β (ℓ_θ − ℓ_ref)``, the group DPO objective
    ``−log σ(R_θ(G⁺) − R_θ(G⁻))`` with advantage-weighted group rewards reads ``−log σ(−s_g)`` with::

        s_g = (β / G) · Σ_{i ∈ g} A_i · (ℓ_θ,i − ℓ_ref,i)

    Its gradient is ``σ(s_g)·∂s_g``; the coded loss is the "gradient-equivalent" (up to a positive
    per-group factor) ``L_i = sg(σ(s_g)) · A_i · ℓ_θ,i``, averaged over the batch by the caller.
    At ``θ = ref`` every ``s_g = 0``: weights ``σ(0) = ½`` and ``−log σ(−s_g) = ln 2``.

    Args:
        policy_errors: ``[b]`` ℓ_θ (with grad; entries already detached by a PPO-style clip stay so).
        ref_errors: ``[b]`` ℓ_ref. advantages: ``[b]`` (clipped by the caller).
        groups: ``[b]`` group index of each sample (0..n_groups−1); every member of a group present.
        group_size: ``G`` in ``s_g`` (the original divides by the configured group size); None = the
            number of members of each group in the batch.
    Returns:
        ``(losses [b], s [n_groups] detached, group_dpo_loss [n_groups] = −log σ(−s))``.
    """
    groups = groups.long().to(policy_errors.device)
    n = int(groups.max()) + 1 if groups.numel() else 0
    a = advantages.float().to(policy_errors.device)
    term = a * beta * (policy_errors.detach().float() - ref_errors.detach().float())
    counts = torch.bincount(groups, minlength=n).to(term) if group_size is None else torch.full((n,), float(group_size))
    s = torch.zeros(n, dtype=term.dtype, device=term.device).scatter_add_(0, groups, term) / counts.to(term)
    weights = torch.sigmoid(s)[groups]
    return weights * a * policy_errors.float(), s, F.softplus(s)


__all__ = ["AWM_WEIGHTINGS", "NFT_LOSS_FORMS", "awm_log_likelihood", "awm_loss", "dgpo_loss", "nft_loss",
           "nft_optimality"]
