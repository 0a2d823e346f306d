"""On-line objectives as pure tensor functions: group-relative advantages and the PPO clip (DDPO, GRPO,
Flow-GRPO), D3PO's clamped-ratio DPO on transitions, SePPO's anchor-flipped DPO, and DenseDPO's
per-segment DPO. Inputs are log-probs of sampler transitions or ELBO log-likelihood surrogates
(``ℓ = −½·L`` of the denoising errors, :func:`diffalign.core.likelihood.elbo_loglik`); no model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffalign.objectives.preference import PreferenceOutput, dpo_loss


def group_advantages(rewards: torch.Tensor, group_size: int, *, global_std: bool = False,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages ``(r − mean_g) / (std + eps)`` for rewards ``[N]`` laid out as consecutive groups
    of ``group_size`` (one prompt each); ``std`` is each group's (population) std, or the whole batch's
    with ``global_std``. Returns ``[N]``."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.float().view(-1, group_size)
    std = r.std(unbiased=False) if global_std else r.std(dim=1, unbiased=False, keepdim=True)
    return ((r - r.mean(dim=1, keepdim=True)) / (std + eps)).view(-1)


def ppo_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                  clip_range: float, adv_clip_max: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ddpo-pytorch's clipped surrogate per transition: ``max(−A·ρ, −A·clip(ρ, 1±ε))`` with
    ``ρ = exp(log_prob − old_log_prob)`` and ``A`` clipped to ``±adv_clip_max``; all ``[b]``.
    Returns ``(losses [b], ratio [b])``."""
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def d3po_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, *,
              beta: float = 0.1, eps: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """D3PO's per-step loss on log-probs ``[b]`` of the preferred (w) and other (l) transition
    under the policy and the reference: ``−log σ(β(log r_w − log r_l))`` with
    ``r = clamp(exp(logp − ref), 1−ε, 1+ε)``. Returns ``(losses, logits, r_w, r_l)``, each ``[b]``."""
    r_w = torch.exp(logp_w - ref_w).clamp(1 - eps, 1 + eps)
    r_l = torch.exp(logp_l - ref_l).clamp(1 - eps, 1 + eps)
    logits = beta * (torch.log(r_w) - torch.log(r_l))
    return -F.logsigmoid(logits), logits, r_w, r_l


def seppo_loss(policy_w: torch.Tensor, policy_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, *,
               beta: float, anchor_flip: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SePPO's per-pair loss from ELBO log-likelihoods ``[b]`` of the winners (w) and the reference model's
    samples (l) under the policy and the reference: Diffusion-DPO, except that a pair whose winner the
    policy fits worse than the reference does (``policy_w < ref_w``, the anchor) treats the reference
    sample as winning too (its log-likelihood terms change sign). Returns ``(losses [b], logits [b],
    flipped [b] bool)``."""
    flipped = (policy_w.detach() < ref_w) if anchor_flip else torch.zeros_like(policy_w, dtype=torch.bool)
    sign = torch.where(flipped, -1.0, 1.0).to(policy_w)
    out = dpo_loss(policy_w, sign * policy_l, ref_w, sign * ref_l, beta=beta)
    return out.losses, out.logits, flipped


def segment_dpo_loss(policy: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, *, beta: float,
                     loss_type: str = "sigmoid", label_smoothing: float = 0.0
                     ) -> tuple[PreferenceOutput, torch.Tensor]:
    """DenseDPO's per-segment DPO from ELBO log-likelihoods ``[2B, S]`` of each segment (``video_0`` rows
    first) under the policy and the reference, and segment ``labels`` ``[B, S]`` (+1: video 0 wins, −1:
    video 1 wins, 0: tie). Returns the DPO output of the labelled segments (flattened, ``[n]``) and the
    ``[B, S]`` mask of labelled segments."""
    p0, p1 = policy.chunk(2)
    r0, r1 = ref.chunk(2)
    labelled = labels != 0
    win = labels[labelled] > 0

    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # per labelled segment: a where video_0 won
        return torch.where(win, a[labelled], b[labelled])

    out = dpo_loss(pick(p0, p1), pick(p1, p0), pick(r0, r1), pick(r1, r0), beta=beta, loss_type=loss_type,
                   label_smoothing=label_smoothing)
    return out, labelled


__all__ = ["d3po_loss", "group_advantages", "ppo_clip_loss", "segment_dpo_loss", "seppo_loss"]
