"""What a training method is: a config dataclass and a loss on an encoded, noised batch.

The shared loop (:mod:`diffalign.trainers.loop`) owns data, encoding, noise, optimisation, logging
and checkpoints. A method owns only its loss. Methods never import each other.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from diffalign.core.likelihood import denoising_error, elbo_loglik
from diffalign.models.base import Conditioning
from diffalign.objectives import dpo_loss

# The method table that :func:`register_method` fills, read through :mod:`diffalign.trainers.registry`.
KINDS: dict[str, str] = {
    "offline": "an encoded, noised batch of stored data (pairs, feedback, ranked lists) on the offline loop",
    "online": "rollouts with per-step log-probs, then updates on the stored transitions",
    "backprop": "sampling with gradients into a differentiable reward",
    "video": "video pairs with per-segment labels on the offline loop",
    "text": "a causal language model on TRL-format text data",
}


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its name, class, config dataclass and kind (a key of :data:`KINDS`)."""

    name: str
    method_class: type
    config_class: type
    kind: str


REGISTERED: dict[str, MethodEntry] = {}


def register_method(name: str, config: type, *, kind: str):
    """Class decorator: register a method as ``name`` with its config dataclass and its ``kind`` (image
    and text methods alike). Sets ``name``, ``config_class`` and ``kind`` on the class (what the
    trainers read); :mod:`diffalign.trainers.registry` looks methods up by name."""
    if kind not in KINDS:
        raise ValueError(f"unknown method kind {kind!r}; choose from {sorted(KINDS)}")

    def decorate(cls: type) -> type:
        old = REGISTERED.get(name)
        if old is not None and old.method_class.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is taken by {old.method_class.__qualname__}")
        cls.name, cls.config_class, cls.kind = name, config, kind
        REGISTERED[name] = MethodEntry(name, cls, config, kind)
        return cls

    return decorate


@dataclass
class TrainBatch:
    """One micro-batch, encoded and noised by the loop.

    For pair methods rows are laid out ``[winners (B), losers (B)]``; the two rows of a pair share
    ``noise`` and ``timesteps``. For single-sample methods (KTO, SFT) rows are independent.

    * ``latents``, ``noise``, ``x_t``, ``target``: ``[N, C, h, w]`` (``N = 2B`` for pairs)
    * ``timesteps``: ``[N]`` as the denoiser takes them
    * ``cond``: conditioning of the ``N`` rows
    * ``weights``: ``[B]`` per-pair (or per-sample) loss weights; ``[N]`` per row for KTO on pairs
    * ``desirable``: ``[N]`` bool, per-row feedback (KTO only)
    * ``prompts``: the ``N`` rows' caption texts (after caption dropout)
    * ``scores``: ``[N]`` per-row reward scores when the data has them (SmPO, RankDPO; NaN where missing)
    * ``users``: the ``B`` pairs' user ids when the data has them (Pick-a-Pic ``user_id``; PPD), else ``None``

    Ranked lists (RankDPO) are laid out like pairs with ``K`` groups: ``[best (B), second (B), ...,
    worst (B)]``, all ``K`` rows of a list sharing noise and timestep.
    """

    latents: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    target: torch.Tensor
    timesteps: torch.Tensor
    cond: Conditioning
    weights: torch.Tensor
    desirable: torch.Tensor | None = None
    prompts: list[str] | None = None
    scores: torch.Tensor | None = None
    users: list[str | None] | None = None


@dataclass
class StepOutput:
    """A method's loss (scalar, weighted mean over the batch) and the metrics it logs (floats)."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class Method:
    """Base class: a subclass registers with ``@register_method(name, ConfigClass, kind="offline")``
    (which sets ``name``, ``config_class`` and ``kind``), sets ``data_kind`` and implements ``loss``."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    kind: ClassVar[str]  # set by register_method
    data_kind: ClassVar[str] = "pairs"  # "pairs" | "feedback" | "feedback-pairs" | "chosen" | "ranked"
    uses_reference: ClassVar[bool] = True
    # whether the loss uses a tied pair (label_0 = 0.5) as its paper does: with data.drop_ties false, a
    # recipe of a method that does not is refused when it loads (a kept tie reads as "image 0 wins")
    uses_ties: ClassVar[bool] = False

    def __init__(self, config, backbone):
        self.config = config
        self.backbone = backbone

    def loss(self, batch: TrainBatch) -> StepOutput:
        raise NotImplementedError

    def invert_batch(self, batch: TrainBatch, *, model: str, num_steps: int, eta: float = 0.0,
                     renoise_steps: int = 0, guidance_scale: float = 1.0) -> TrainBatch:
        """``batch`` with ``x_t`` replaced by the inversion of its clean latents to its timesteps and
        ``noise`` / ``target`` by the re-parametrised ones (:func:`diffalign.core.inversion.invert`;
        ``model`` is ``"policy"`` or ``"reference"``). The η noise comes from :func:`batch_generator`."""
        from diffalign.core.inversion import invert

        inv = invert(self.backbone, batch.latents, batch.timesteps, batch.cond, model=model, num_steps=num_steps,
                     eta=eta, renoise_steps=renoise_steps, guidance_scale=guidance_scale,
                     generator=batch_generator(batch, "inversion") if eta > 0 else None)
        dtype = batch.x_t.dtype
        return dataclasses.replace(batch, x_t=inv.x_t.to(dtype), noise=inv.noise.to(dtype), target=inv.target.to(dtype))

    def errors(self, batch: TrainBatch, *, reference: bool = False) -> torch.Tensor:
        """Per-row denoising errors ``[N]`` of the policy (or, without gradients, the reference)."""
        if not reference:
            return denoising_error(self.backbone.predict(batch.x_t, batch.timesteps, batch.cond), batch.target)
        with torch.no_grad(), self.backbone.reference():
            return denoising_error(self.backbone.predict(batch.x_t, batch.timesteps, batch.cond), batch.target)


def weighted_mean(losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ w·loss / Σ w`` over the batch."""
    weights = weights.to(losses)
    return (losses * weights).sum() / weights.sum().clamp_min(1e-12)


def batch_generator(batch: TrainBatch, tag: str = "") -> torch.Generator:
    """A CPU generator seeded by the batch's noise (itself a function of the seed and the run position):
    method-side randomness that a resumed or re-sharded run draws identically."""
    digest = hashlib.blake2b(batch.noise.detach().float().cpu().numpy().tobytes() + tag.encode(), digest_size=8)
    return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1))


def dpo_metrics(logits: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                policy_errors: torch.Tensor, ref_errors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The pair metrics every DPO-type method logs: implicit accuracy (ties ½), reward margin, the
    implicit rewards and the per-side errors (``*_errors``: ``[2B]``, winners first)."""
    logits = logits.detach()
    ew, el = policy_errors.detach().chunk(2)
    rw, rl = ref_errors.detach().chunk(2)
    return {
        "implicit_acc": (logits > 0).float().mean() + 0.5 * (logits == 0).float().mean(),
        "reward_margin": (chosen_rewards - rejected_rewards).mean(),
        "reward_chosen": chosen_rewards.mean(),
        "reward_rejected": rejected_rewards.mean(),
        "model_mse_chosen": ew.mean(),
        "model_mse_rejected": el.mean(),
        "ref_mse_chosen": rw.mean(),
        "ref_mse_rejected": rl.mean(),
    }


def diffusion_dpo_loss(
    policy_errors: torch.Tensor,
    ref_errors: torch.Tensor,
    weights: torch.Tensor,
    config,
) -> StepOutput:
    """Diffusion-DPO on per-sample denoising errors ``[2B]`` (winners first, then losers); ``config`` has
    ``beta``, ``label_smoothing`` and ``terms()`` (``DiffusionDPOConfig``, ``PPDConfig``).

    ``loss = −log σ(−½β((Lθw − Lθl) − (Lrw − Lrl)))`` (and the other terms of ``config.loss_type``).
    """
    policy_w, policy_l = elbo_loglik(policy_errors).chunk(2)
    ref_w, ref_l = elbo_loglik(ref_errors).chunk(2)
    total = policy_errors.new_zeros(())
    out = None
    for loss_type, w in config.terms():
        if loss_type == "sft":
            term = policy_errors.chunk(2)[0]
        else:
            out = dpo_loss(policy_w, policy_l, ref_w, ref_l, beta=config.beta, loss_type=loss_type,
                           label_smoothing=config.label_smoothing)
            term = out.losses
        total = total + w * weighted_mean(term, weights)
    if out is None:  # metrics need the DPO logit even when only "sft" is trained
        out = dpo_loss(policy_w, policy_l, ref_w, ref_l, beta=config.beta)
    return StepOutput(total, dpo_metrics(out.logits, out.chosen_rewards, out.rejected_rewards, policy_errors, ref_errors))
