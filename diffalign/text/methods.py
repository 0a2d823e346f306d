"""Text preference methods: a config dataclass and a loss each, on the shared objectives.

Each loss reads sequence log-probs of completions (:mod:`diffalign.text.logprobs`) and calls a pure
function of :mod:`diffalign.objectives`, as the diffusion methods do with ELBO surrogates:

=========== =========================================================== ==========================
method      loss (per pair / sample)                                    log-probs
=========== =========================================================== ==========================
text-sft    −log π(y|x) per completion token                            token mean over the batch
text-dpo    ``dpo_loss``: sigmoid / ipo / hinge / robust (+ sft term)  sum (ipo: mean), TRL's
text-kto    ``kto_loss``, reference point from mismatched pairs         sum
text-simpo  ``simpo_loss``: −log σ(β(ℓ̄w − ℓ̄l) − γ) (+ sft term)        mean, no reference
text-orpo   ``orpo_loss``: −ℓ̄w − β log σ(log odds_w − log odds_l)       mean, no reference
=========== =========================================================== ==========================

Per-pair ``weight`` (Sem-DPO's semantic weight) multiplies each pair's loss (weighted mean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from diffalign.objectives import dpo_loss, kto_loss, loss_terms, orpo_loss, simpo_loss
from diffalign.text.logprobs import TokenBatch
from diffalign.trainers.method import REGISTERED, StepOutput, register_method, weighted_mean


@dataclass
class TextBatch:
    """One micro-batch of tokenised rows.

    * ``tokens``: pairs ``[chosen (B); rejected (B)]``; feedback ``[completions (B); mismatched
      completions (B)]`` (row ``B+i`` is prompt ``i`` with completion ``i−1``: KTO's KL estimate);
      completion (SFT) ``[B]``. Each tensor ``[N, S]``.
    * ``weights``: ``[B]`` per-pair (per-sample) loss weights.
    * ``desirable``: ``[B]`` bool (KTO only).
    """

    tokens: TokenBatch
    weights: torch.Tensor
    desirable: torch.Tensor | None = None


@dataclass
class TextConfig:
    """Knobs every text method has.

    Attributes:
        max_length: prompt + completion tokens kept per row (TRL's default 1024, ``keep_start``: a
            row whose prompt alone reaches it is dropped, a longer completion is cut).
        disable_dropout: dropout off in the policy (TRL's default), so policy and reference agree at
            initialisation.
    """

    max_length: int = 1024
    disable_dropout: bool = True


def _preference_metrics(out, logps_chosen, logps_rejected) -> dict[str, torch.Tensor]:
    logits = out.logits.detach()
    return {
        "implicit_acc": (logits > 0).float().mean() + 0.5 * (logits == 0).float().mean(),
        "reward_chosen": out.chosen_rewards.mean(),
        "reward_rejected": out.rejected_rewards.mean(),
        "reward_margin": (out.chosen_rewards - out.rejected_rewards).mean(),
        "logps_chosen": logps_chosen.detach().mean(),
        "logps_rejected": logps_rejected.detach().mean(),
    }


def _sft_nll(lp, weights: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL ``Σ_i w_i·(−Σ_t log p) / Σ_i w_i·n_i`` of ``[B]`` sequences."""
    w = weights.to(lp.sum)
    return -(w * lp.sum).sum() / (w * lp.num_tokens).sum().clamp_min(1)


class TextMethod:
    """Base class: a subclass registers with ``@register_method(name, ConfigClass, kind="text")``
    (:mod:`diffalign.trainers.registry`), sets ``data_kind`` and implements ``loss``."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    kind: ClassVar[str]  # set by register_method
    data_kind: ClassVar[str] = "pairs"  # "pairs" | "feedback" | "completion"
    uses_reference: ClassVar[bool] = True

    def __init__(self, config, lm):
        self.config = config
        self.lm = lm

    def loss(self, batch: TextBatch) -> StepOutput:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------- SFT
@dataclass
class TextSFTConfig(TextConfig):
    """Supervised fine-tuning on completions (the prompt is masked), e.g. (prompt, rewrite) pairs."""


@register_method("text-sft", TextSFTConfig, kind="text")
class TextSFT(TextMethod):
    data_kind = "completion"
    uses_reference = False

    def loss(self, batch: TextBatch) -> StepOutput:
        lp = self.lm.logprobs(batch.tokens)
        nll = _sft_nll(lp, batch.weights)
        return StepOutput(nll, {"nll": nll.detach(), "num_tokens": lp.num_tokens.float().mean()})


# ---------------------------------------------------------------------------------------- DPO
@dataclass
class TextDPOConfig(TextConfig):
    """DPO and its variants (TRL's ``DPOConfig`` names and defaults).

    Attributes:
        beta: KL strength β (TRL's default 0.1).
        loss_type: one name or a list combined with ``loss_weights``: ``sigmoid`` (DPO), ``ipo``
            (on mean per-token log-probs, as TRL), ``hinge``, ``robust``, ``sft`` (NLL of the chosen
            completion; ``["sigmoid", "sft"]`` is RPO).
        loss_weights: weight of each entry of ``loss_type`` (default all 1).
        label_smoothing: ε of conservative (``sigmoid``) / robust DPO.
    """

    beta: float = 0.1
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0

    def terms(self) -> list[tuple[str, float]]:
        return loss_terms(self.loss_type, self.loss_weights)


@register_method("text-dpo", TextDPOConfig, kind="text")
class TextDPO(TextMethod):
    def __init__(self, config: TextDPOConfig, lm):
        super().__init__(config, lm)
        config.terms()  # fail at construction on a bad loss_type

    def loss(self, batch: TextBatch) -> StepOutput:
        cfg = self.config
        policy, ref = self.lm.logprobs(batch.tokens), self.lm.logprobs(batch.tokens, reference=True)
        pw, pl = policy.sum.chunk(2)
        rw, rl = ref.sum.chunk(2)
        total, out = pw.new_zeros(()), None
        for loss_type, w in cfg.terms():
            if loss_type == "sft":
                nw, _ = policy.num_tokens.chunk(2)
                term = -pw / nw.clamp_min(1)
            elif loss_type == "ipo":
                mw, ml = policy.mean.chunk(2)
                rmw, rml = ref.mean.chunk(2)
                term = dpo_loss(mw, ml, rmw, rml, beta=cfg.beta, loss_type="ipo").losses
            else:
                out = dpo_loss(pw, pl, rw, rl, beta=cfg.beta, loss_type=loss_type, label_smoothing=cfg.label_smoothing)
                term = out.losses
            total = total + w * weighted_mean(term, batch.weights)
        if out is None:  # metrics read the sigmoid logit whatever is trained
            out = dpo_loss(pw, pl, rw, rl, beta=cfg.beta)
        return StepOutput(total, _preference_metrics(out, pw, pl))


# ---------------------------------------------------------------------------------------- KTO
@dataclass
class TextKTOConfig(TextConfig):
    """KTO on unpaired feedback (TRL's ``KTOConfig`` defaults).

    Attributes:
        beta: 0.1.
        desirable_weight, undesirable_weight: λ_D, λ_U (1.0); TRL advises
            ``λ_D·n_D / (λ_U·n_U)`` in [1, 4/3].
    """

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


@register_method("text-kto", TextKTOConfig, kind="text")
class TextKTO(TextMethod):
    data_kind = "feedback"

    def loss(self, batch: TextBatch) -> StepOutput:
        from accelerate.utils import gather

        cfg = self.config
        n = batch.weights.shape[0]
        with torch.no_grad():  # KL rows: mismatched (prompt_i, completion_{i-1}), no gradient (as TRL)
            kl_rows = _rows(batch.tokens, slice(n, 2 * n))
            kl_policy = self.lm.logprobs(kl_rows).sum
        ref = self.lm.logprobs(batch.tokens, reference=True).sum
        policy = self.lm.logprobs(_rows(batch.tokens, slice(0, n))).sum
        kl = gather((kl_policy - ref[n:]).mean().reshape(1)).mean().clamp_min(0)
        losses, z0 = kto_loss(policy, ref[:n], batch.desirable, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                              undesirable_weight=cfg.undesirable_weight, kl_reference_point=kl)
        rewards = (cfg.beta * (policy - ref[:n])).detach()
        d = batch.desirable.bool()
        metrics = {"kl": z0.detach(), "reward_desirable": _masked_mean(rewards, d),
                   "reward_undesirable": _masked_mean(rewards, ~d)}
        return StepOutput(weighted_mean(losses, batch.weights), metrics)


def _rows(tokens: TokenBatch, index: slice) -> TokenBatch:
    return TokenBatch(tokens.input_ids[index], tokens.attention_mask[index], tokens.completion_mask[index])


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


# ---------------------------------------------------------------------------------------- SimPO / ORPO
@dataclass
class TextSimPOConfig(TextConfig):
    """SimPO: reference-free, length-normalised.

    Attributes:
        beta: 2.0 (the SimPO paper's range is about 2–10; TRL's CPO default 0.1 is not a SimPO value).
        gamma: target margin γ (TRL's ``simpo_gamma`` 0.5).
        label_smoothing: ε.
        sft_weight: weight of the chosen completion's NLL (TRL's ``cpo_alpha``; 0 = pure SimPO,
            > 0 = CPO-SimPO).
    """

    beta: float = 2.0
    gamma: float = 0.5
    label_smoothing: float = 0.0
    sft_weight: float = 0.0


@register_method("text-simpo", TextSimPOConfig, kind="text")
class TextSimPO(TextMethod):
    uses_reference = False

    def loss(self, batch: TextBatch) -> StepOutput:
        cfg = self.config
        policy = self.lm.logprobs(batch.tokens)
        mw, ml = policy.mean.chunk(2)
        out = simpo_loss(mw, ml, beta=cfg.beta, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing)
        total = weighted_mean(out.losses, batch.weights)
        if cfg.sft_weight:
            total = total + cfg.sft_weight * weighted_mean(-mw, batch.weights)
        return StepOutput(total, _preference_metrics(out, policy.sum.chunk(2)[0], policy.sum.chunk(2)[1]))


@dataclass
class TextORPOConfig(TextConfig):
    """ORPO: reference-free; the chosen NLL plus λ times the log odds-ratio term.

    Attributes:
        beta: λ (TRL's ORPO ``beta``, default 0.1).
    """

    beta: float = 0.1


@register_method("text-orpo", TextORPOConfig, kind="text")
class TextORPO(TextMethod):
    uses_reference = False

    def loss(self, batch: TextBatch) -> StepOutput:
        policy = self.lm.logprobs(batch.tokens)
        mw, ml = policy.mean.chunk(2)
        out = orpo_loss(mw, ml, beta=self.config.beta)
        metrics = _preference_metrics(out, *policy.sum.chunk(2))
        metrics["nll"] = (-mw).detach().mean()
        return StepOutput(weighted_mean(out.losses, batch.weights), metrics)


def build_text_method(section, lm) -> TextMethod:
    """A recipe's method section (:class:`~diffalign.trainers.config.MethodSection`, as
    ``diffalign.trainers.registry.load_recipe`` builds it) → its text method (registered with
    ``kind="text"``) on ``lm``, with a copy of its checked config dataclass."""
    if section.kind != "text":
        text = sorted(n for n, e in REGISTERED.items() if e.kind == "text")
        raise ValueError(f"method {section.name!r} is not a text method (its kind is {section.kind!r}); "
                         f"text methods: {text}")
    return section.build(lm)
