"""DCPO: Dual Caption Preference Optimization (Saeidi et al., TMLR 2025)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from diffalign.core.likelihood import elbo_loglik
from diffalign.objectives import DPO_LOSS_TYPES, dpo_loss
from diffalign.trainers.method import (
    Method,
    StepOutput,
    TrainBatch,
    dpo_metrics,
    register_method,
    weighted_mean,
)


@dataclass
class DCPOConfig:
    """DCPO.

    Attributes:
        beta: DPO strength on ``ℓ = −½L`` (500 in the official SD2.1 launcher).
        loss_type: a Diffusion-DPO loss form (``sigmoid``, ``ipo``, ``hinge``, ``robust``).
        label_smoothing: conservative / robust DPO ε.
    """

    beta: float = 500.0
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose from {DPO_LOSS_TYPES}")


@register_method("dcpo", DCPOConfig, kind="offline")
class DCPO(Method):
    """Diffusion-DPO where the winner is conditioned on its caption ``c_w`` and the loser on its own
    ``c_l`` (Pick-a-Pic column ``caption_1`` / JSONL field ``prompt_rejected``)::

        loss = −log σ(−½β((Lθ(x_w|c_w) − Lθ(x_l|c_l)) − (Lref(x_w|c_w) − Lref(x_l|c_l))))

    The regression target is the model's own (ε, v or flow velocity), from the forward process; the
    original forces ε on SD2.1, a v-prediction model. Logs ``distinct_captions``: the fraction of
    pairs whose two captions differ (0 means the data has no loser captions: plain Diffusion-DPO).
    """

    _warned = False

    def loss(self, batch: TrainBatch) -> StepOutput:
        c = self.config
        policy_errors, ref_errors = self.errors(batch), self.errors(batch, reference=True)
        pw, pl = elbo_loglik(policy_errors).chunk(2)
        rw, rl = elbo_loglik(ref_errors).chunk(2)
        out = dpo_loss(pw, pl, rw, rl, beta=c.beta, loss_type=c.loss_type, label_smoothing=c.label_smoothing)
        metrics = dpo_metrics(out.logits, out.chosen_rewards, out.rejected_rewards, policy_errors, ref_errors)
        if batch.prompts is not None:
            b = len(batch.prompts) // 2
            distinct = [w != l for w, l in zip(batch.prompts[:b], batch.prompts[b:])]
            metrics["distinct_captions"] = pw.new_tensor(sum(distinct) / max(b, 1))
            if not any(distinct) and any(batch.prompts[:b]) and not DCPO._warned:
                DCPO._warned = True
                warnings.warn("DCPO: winner and loser captions are identical in this batch; does the data have a "
                              "loser caption (Pick-a-Pic 'caption_1', JSONL 'prompt_rejected')?", stacklevel=2)
        return StepOutput(weighted_mean(out.losses, batch.weights), metrics)
