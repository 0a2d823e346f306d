"""Per-sample denoising error and its ELBO log-likelihood surrogate.

Every offline method (Diffusion-DPO, MaPO, KTO, DCPO, RankDPO, InPO, SmPO, DenseDPO) reads these.

The diffusion ELBO is ``log p(x0) ≥ −½ E_t[w_t ‖target − pred‖²] + C``. With unit weighting and one
sampled timestep, the log-likelihood surrogate of a sample is ``ℓ = −½ · L`` where ``L`` is the
per-sample mean squared error. With it the shared DPO objective reads exactly like the official
Diffusion-DPO code: ``β·((ℓθw − ℓrw) − (ℓθl − ℓrl)) = −½β((Lθw − Lθl) − (Lrw − Lrl))``.
"""

from __future__ import annotations

import torch


def denoising_error(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean squared error ``[B]``: mean over every non-batch dim.

    ``mask`` (broadcastable to ``prediction``, 1 = counted) restricts the mean to a region, e.g. the
    latent frames of one video segment (DenseDPO). Computed in fp32.
    """
    se = (prediction.float() - target.float()) ** 2
    if mask is None:
        return se.flatten(1).mean(1)
    mask = mask.to(se.dtype).expand_as(se)
    return (se * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)


def elbo_loglik(error: torch.Tensor) -> torch.Tensor:
    """ELBO log-likelihood surrogate ``ℓ = −½·L`` of per-sample errors ``[B]``."""
    return -0.5 * error
