"""Adv-GRPO's adversarial reward (showlab/Adv-GRPO, arXiv 2511.20256) as pure tensor functions: the hinge loss
of the discriminator head on a frozen vision model's features, and the reward it gives a generated image.

The head ``D`` scores one feature vector (the CLS token, or one patch token). With reference images as
positives and generations as negatives (``train_dino`` in ``scripts/train_sd3_fast_dino_patch.py``)::

    L_D = ½ [mean ReLU(1 − D(cls_ref)) + mean ReLU(1 + D(cls_gen))]
        + w_p · ½ [mean ReLU(1 − D(p_ref)) + mean ReLU(1 + D(p_gen))]      w_p = 0.3, p: sampled patches

and GRPO maximises ``R = w_c · D(cls) + (1 − w_c) · mean_p D(p)`` (``w_c = 0.7``, 64 random patches;
``dino_patch_cotrain_score`` in ``adv_grpo/rewards.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hinge_discriminator_loss(real_cls: torch.Tensor, fake_cls: torch.Tensor, real_patch: torch.Tensor | None = None,
                             fake_patch: torch.Tensor | None = None, *, patch_weight: float = 0.3
                             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Adv-GRPO's discriminator loss ``L_D`` (module docstring) from head logits: ``real_cls`` ``[B_r]``,
    ``fake_cls`` ``[B_f]`` and optionally patch logits ``real_patch`` ``[B_r, n]``, ``fake_patch`` ``[B_f, n]``
    (no patch term when None). Returns ``(loss, terms)`` with ``terms`` = ``cls_loss``, ``patch_loss`` and
    ``accuracy`` (½ [share of real CLS logits > 0 + share of fake CLS logits < 0])."""
    cls_loss = 0.5 * (F.relu(1.0 - real_cls).mean() + F.relu(1.0 + fake_cls).mean())
    loss, terms = cls_loss, {"cls_loss": cls_loss.detach()}
    if real_patch is not None and fake_patch is not None and patch_weight:
        patch_loss = 0.5 * (F.relu(1.0 - real_patch).mean() + F.relu(1.0 + fake_patch).mean())
        loss = loss + patch_weight * patch_loss
        terms["patch_loss"] = patch_loss.detach()
    terms["accuracy"] = 0.5 * ((real_cls.detach() > 0).float().mean() + (fake_cls.detach() < 0).float().mean())
    return loss, terms


def discriminator_reward(cls_logits: torch.Tensor, patch_logits: torch.Tensor | None = None, *,
                         cls_weight: float = 0.7) -> torch.Tensor:
    """The reward ``w_c · D(cls) + (1 − w_c) · mean_p D(p)`` per image from ``cls_logits`` ``[B]`` and
    ``patch_logits`` ``[B, n]`` (``D(cls)`` alone when None). Returns ``[B]``."""
    if patch_logits is None:
        return cls_logits
    return cls_weight * cls_logits + (1.0 - cls_weight) * patch_logits.mean(dim=1)


__all__ = ["discriminator_reward", "hinge_discriminator_loss"]
