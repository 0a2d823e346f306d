"""DDIM-InPO (Lu et al., CVPR 2025): Diffusion-DPO on inverted latents with re-parametrised targets."""

from __future__ import annotations

from dataclasses import dataclass

from diffalign.core.forward import FlowMatchingForward
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
class InPOConfig:
    """DDIM-InPO.

    Attributes:
        beta: DPO strength on ``ℓ = −½L``: 5000 in the official SDXL launcher, 2000 for SD1.5.
        num_inversion_steps: grid of the DDIM inversion (10 in the original, SD1.5 and SDXL); a pair at
            timestep t takes one model call per grid level below t, plus one.
        eta: noise added after every inversion step, ``η·s·z``; ``None`` (default): 0.1 on DDPM-type models
            (the original's SD1.5/SDXL value), 0 on flow models (SD3), where no such noise is defined.
        invert_with: ``"policy"`` (the original: the UNet being trained, without gradients) or
            ``"reference"``.
        guidance_scale: classifier-free guidance during the inversion (the original: none, 1.0).
        loss_type: a Diffusion-DPO loss form (``sigmoid``, ``ipo``, ``hinge``, ``robust``).
        label_smoothing: conservative / robust DPO ε.
    """

    beta: float = 5000.0
    num_inversion_steps: int = 10
    eta: float | None = None
    invert_with: str = "policy"
    guidance_scale: float = 1.0
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.invert_with not in ("policy", "reference"):
            raise ValueError(f"invert_with must be 'policy' or 'reference', not {self.invert_with!r}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose from {DPO_LOSS_TYPES}")


@register_method("inpo", InPOConfig, kind="offline")
class InPO(Method):
    """Each image of a pair is DDIM-inverted to the pair's timestep t (no gradients); the noise
    target is re-parametrised so the inverted latent is exactly ``x_t``; then the Diffusion-DPO loss
    ``−log σ(−½β((Lθw − Lθl) − (Lrw − Lrl)))`` on those latents. Any batch size: every row is
    inverted to its own t in one batched walk."""

    @property
    def eta(self) -> float:
        """The configured ``eta``, or the default for this backbone's forward process."""
        if self.config.eta is not None:
            return self.config.eta
        return 0.0 if isinstance(self.backbone.forward_process, FlowMatchingForward) else 0.1

    def loss(self, batch: TrainBatch) -> StepOutput:
        c = self.config
        batch = self.invert_batch(batch, model=c.invert_with, num_steps=c.num_inversion_steps, eta=self.eta,
                                  guidance_scale=c.guidance_scale)
        policy_errors, ref_errors = self.errors(batch), self.errors(batch, reference=True)
        pw, pl = elbo_loglik(policy_errors).chunk(2)
        rw, rl = elbo_loglik(ref_errors).chunk(2)
        out = dpo_loss(pw, pl, rw, rl, beta=c.beta, loss_type=c.loss_type, label_smoothing=c.label_smoothing)
        return StepOutput(weighted_mean(out.losses, batch.weights),
                          dpo_metrics(out.logits, out.chosen_rewards, out.rejected_rewards, policy_errors, ref_errors))
