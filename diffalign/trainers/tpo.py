"""TPO, text preference optimisation: for the same image, the matched caption is preferred over a
perturbed one (no image pairs needed). DPO and KTO forms."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

import torch

from diffalign.core.likelihood import elbo_loglik
from diffalign.models.base import Conditioning
from diffalign.objectives import DPO_LOSS_TYPES, dpo_loss, kto_loss
from diffalign.text.perturb import KINDS, perturb_caption
from diffalign.trainers.method import (
    Method,
    StepOutput,
    TrainBatch,
    batch_generator,
    dpo_metrics,
    register_method,
    weighted_mean,
)

FORMS = ("dpo", "kto")


@dataclass
class TPOConfig:
    """TPO.

    Attributes:
        form: ``"dpo"`` (pairwise: matched vs perturbed caption of one image) or ``"kto"`` (each
            (image, caption) row alone: matched desirable, perturbed undesirable).
        beta: strength on ``ℓ = −½L``: Diffusion-DPO's 5000 (DPO form); 2000 (KTO form, as
            Diffusion-KTO's ``beta_dpo = 1000``).
        perturb_kinds: rule kinds of :func:`diffalign.text.perturb.perturb_caption` to draw from
            (colour, count, object, relation).
        perturb_vocab: word lists replacing the perturbation's defaults (``{"colour": [...], "count":
            [...], "object": [...], "relation": {...}}``), e.g. a small model's known words.
        loss_type, label_smoothing: the DPO form's loss (``sigmoid``, ``ipo``, ``hinge``, ``robust``).
        desirable_weight, undesirable_weight: the KTO form's λ_D, λ_U.
        flip_labels: prefer the perturbed caption instead (the label-flipped control of an experiment).
    """

    form: str = "dpo"
    beta: float = 5000.0
    perturb_kinds: list[str] = field(default_factory=lambda: list(KINDS))
    perturb_vocab: dict | None = None
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    flip_labels: bool = False

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, not {self.form!r}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {self.loss_type!r}; choose from {DPO_LOSS_TYPES}")
        perturb_caption("a red circle", random.Random(0), kinds=self.perturb_kinds, vocab=self.perturb_vocab)  # validates


def negative_captions(prompts: list[str], rng: random.Random, kinds, vocab=None) -> list[str | None]:
    """A mismatched caption per prompt: a rule-based perturbation; when no rule applies, the next
    different prompt of the batch; None for an empty (dropped) prompt or when neither exists."""
    out: list[str | None] = []
    for i, p in enumerate(prompts):
        if not p:
            out.append(None)
            continue
        neg = perturb_caption(p, rng, kinds=kinds, vocab=vocab)
        if neg is None:
            neg = next((q for q in prompts[i + 1:] + prompts[:i] if q and q != p), None)
        out.append(neg)
    return out


@register_method("tpo", TPOConfig, kind="offline")
class TPO(Method):
    """Rows are the chosen images with their captions (any pair data: its winners; ``data_kind =
    "chosen"``). Each caption ``c`` gets a perturbed ``c'`` (:func:`negative_captions`); the same
    noised latent ``x_t`` is scored under both, so only the condition differs::

        DPO: −log σ(−½β((Lθ(x|c) − Lθ(x|c')) − (Lref(x|c) − Lref(x|c'))))
        KTO: Diffusion-KTO on the 2B rows, (x, c) desirable and (x, c') undesirable

    Rows with no usable negative (dropped caption) get weight 0.
    """

    data_kind = "chosen"

    def loss(self, batch: TrainBatch) -> StepOutput:
        c = self.config
        if batch.prompts is None:
            raise ValueError("TPO needs the batch's caption texts (TrainBatch.prompts)")
        rng = random.Random(batch_generator(batch, "tpo").initial_seed())
        negatives = negative_captions(batch.prompts, rng, c.perturb_kinds, c.perturb_vocab)
        keep = torch.tensor([n is not None for n in negatives], device=batch.weights.device)
        neg_cond = self.backbone.encode_prompt([n if n is not None else p for n, p in zip(negatives, batch.prompts)])
        neg_cond = dataclasses.replace(neg_cond.to(batch.cond.prompt_embeds.device), time_ids=batch.cond.time_ids)
        conds = [neg_cond, batch.cond] if c.flip_labels else [batch.cond, neg_cond]  # preferred rows first
        doubled = dataclasses.replace(
            batch, latents=batch.latents.repeat(2, 1, 1, 1), noise=batch.noise.repeat(2, 1, 1, 1),
            x_t=batch.x_t.repeat(2, 1, 1, 1), target=batch.target.repeat(2, 1, 1, 1),
            timesteps=batch.timesteps.repeat(2), cond=Conditioning.cat(conds))
        weights = batch.weights * keep.to(batch.weights.dtype)
        policy_errors, ref_errors = self.errors(doubled), self.errors(doubled, reference=True)
        policy, ref = elbo_loglik(policy_errors), elbo_loglik(ref_errors)
        if c.form == "dpo":
            (pw, pl), (rw, rl) = policy.chunk(2), ref.chunk(2)
            out = dpo_loss(pw, pl, rw, rl, beta=c.beta, loss_type=c.loss_type, label_smoothing=c.label_smoothing)
            metrics = dpo_metrics(out.logits, out.chosen_rewards, out.rejected_rewards, policy_errors, ref_errors)
            return StepOutput(weighted_mean(out.losses, weights), metrics)
        b = batch.x_t.shape[0]
        desirable = torch.cat([torch.ones(b, dtype=torch.bool), torch.zeros(b, dtype=torch.bool)]).to(keep.device)
        losses, z0 = kto_loss(policy, ref, desirable, beta=c.beta, desirable_weight=c.desirable_weight,
                              undesirable_weight=c.undesirable_weight)
        r = (c.beta * (policy - ref)).detach()
        metrics = {"kl_reference_point": z0.detach(), "reward_matched": r[:b].mean(), "reward_perturbed": r[b:].mean(),
                   "implicit_acc": (r[:b] > r[b:]).float().mean() + 0.5 * (r[:b] == r[b:]).float().mean()}
        return StepOutput(weighted_mean(losses, weights.repeat(2)), metrics)
