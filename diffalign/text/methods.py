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
text-orpo   NLL − β log σ(log odds_w − log odds_l)                      mean, no reference
=========== =========================================================== ==========================

By default each loss equals TRL 1.16's (``DPOTrainer``, ``KTOTrainer``, ``CPOTrainer`` with
``loss_type="simpo"``, ``ORPOTrainer``) on the same data, tokenisation included
(``tests/text/test_trl_equivalence.py``); the forms diffalign keeps besides are named config options
(``conservative``, ``sft_average="sequences"``, ``nll="completion_mean"``, ``tokenization``).
An SFT/NLL term is a token mean over the batch, as TRL's: ``Σ_i w_i·(−Σ_t log p) / Σ_i w_i·n_i``.

Per-pair ``weight`` (Sem-DPO's semantic weight) multiplies each pair's loss (weighted mean).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from diffalign.objectives import dpo_loss, kto_loss, loss_terms, orpo_loss, simpo_loss
from diffalign.text.batches import TextBatch, load_lm_for_training, load_text_data
from diffalign.text.logprobs import TOKENIZATIONS, TokenBatch
from diffalign.trainers.method import (
    REGISTERED,
    StepOutput,
    register_method,
    weighted_mean,
)


@dataclass
class TextConfig:
    """Knobs every text method has.

    Attributes:
        max_length: prompt + completion tokens kept per row (TRL's default 1024, ``keep_start``: a
            row whose prompt alone reaches it is dropped, a longer completion is cut).
        disable_dropout: dropout off in the policy (TRL's default), so policy and reference agree at
            initialisation.
        tokenization: which TRL trainer's tokenisation to follow (``None``: the method's own TRL
            trainer's): ``"dpo"`` (``DPOTrainer``/``KTOTrainer``: EOS appended to plain-string
            completions only) or ``"cpo"`` (``CPOTrainer``/``ORPOTrainer``: BOS prepended if missing,
            EOS appended to every completion, conversational ones too). See
            :func:`diffalign.text.logprobs.tokenize_example`.
    """

    max_length: int = 1024
    disable_dropout: bool = True
    tokenization: str | None = None

    def __post_init__(self):
        if self.tokenization not in (None, *TOKENIZATIONS):
            raise ValueError(f"tokenization must be one of {TOKENIZATIONS} (or None), not {self.tokenization!r}")


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


def _token_mean_nll(logp_sum: torch.Tensor, num_tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Token-mean NLL ``Σ_i w_i·(−Σ_t log p) / Σ_i w_i·n_i`` of ``[B]`` sequences (TRL's SFT terms:
    the mean over every token of the batch)."""
    w = weights.to(logp_sum)
    return -(w * logp_sum).sum() / (w * num_tokens).sum().clamp_min(1)


def _sft_nll(lp, weights: torch.Tensor) -> torch.Tensor:
    return _token_mean_nll(lp.sum, lp.num_tokens, weights)


SFT_AVERAGES = ("tokens", "sequences")


def _chosen_nll(lp, weights: torch.Tensor, average: str) -> torch.Tensor:
    """NLL of the chosen completions (rows ``[:B]`` of ``lp``): ``tokens``, the token mean over the
    batch (TRL's); ``sequences``, the mean over pairs of per-sequence token means."""
    s, _ = lp.sum.chunk(2)
    n, _ = lp.num_tokens.chunk(2)
    if average == "tokens":
        return _token_mean_nll(s, n, weights)
    return weighted_mean(-s / n.clamp_min(1), weights)


def _check_average(value: str) -> None:
    if value not in SFT_AVERAGES:
        raise ValueError(f"sft_average must be one of {SFT_AVERAGES}, not {value!r}")


class TextMethod:
    """Base class: a subclass registers with ``@register_method(name, ConfigClass, kind="text")``
    (:mod:`diffalign.trainers.registry`), sets ``data_kind`` and implements ``loss``."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    kind: ClassVar[str]  # set by register_method
    data_kind: ClassVar[str] = "pairs"  # "pairs" | "feedback" | "completion"
    uses_reference: ClassVar[bool] = True
    trl_tokenization: ClassVar[str] = "dpo"  # the tokenisation of the method's TRL trainer

    def __init__(self, config, lm):
        self.config = config
        self.lm = lm

    # ---- the engine's hooks (diffalign.trainers.loop.setup)
    @classmethod
    def load_model(cls, recipe, accelerator):
        """The causal LM, trainable (:func:`~diffalign.text.batches.load_lm_for_training`)."""
        return load_lm_for_training(recipe, accelerator, cls)

    def training_data(self, run):
        """The tokenised TRL-format examples (:func:`~diffalign.text.batches.load_text_data`)."""
        return load_text_data(run.recipe, self, self.lm.tokenizer, run.accelerator)

    @property
    def tokenization(self) -> str:
        """The tokenisation of the data (``config.tokenization``, else the TRL trainer's)."""
        return self.config.tokenization or self.trl_tokenization

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
    """DPO and its variants (TRL 1.16's ``DPOConfig`` names, defaults and losses).

    Attributes:
        beta: KL strength β (TRL's default 0.1).
        loss_type: one name or a list combined with ``loss_weights``: ``sigmoid`` (DPO), ``ipo``
            (on mean per-token log-probs, as TRL), ``hinge``, ``robust``, ``sft`` (NLL of the chosen
            completions; ``["sigmoid", "sft"]`` is RPO).
        loss_weights: weight of each entry of ``loss_type`` (default all 1).
        label_smoothing: ε of ``robust`` DPO. As in TRL 1.16, ``sigmoid`` ignores it unless
            ``conservative`` is set.
        conservative: ``sigmoid`` becomes conservative DPO (cDPO, ``−(1−ε)·log σ(z) − ε·log σ(−z)``,
            older TRL releases' ``sigmoid`` with ``label_smoothing``). Off by default (TRL 1.16's form).
        sft_average: how the ``sft`` term averages the chosen NLL: ``"tokens"`` (TRL's: the mean over
            every chosen completion token of the batch) or ``"sequences"`` (the mean over pairs of
            each completion's per-token mean).
    """

    beta: float = 0.1
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    conservative: bool = False
    sft_average: str = "tokens"

    def __post_init__(self):
        super().__post_init__()
        _check_average(self.sft_average)

    def terms(self) -> list[tuple[str, float]]:
        return loss_terms(self.loss_type, self.loss_weights)


@register_method("text-dpo", TextDPOConfig, kind="text")
class TextDPO(TextMethod):
    def __init__(self, config: TextDPOConfig, lm):
        super().__init__(config, lm)
        names = [t for t, _ in config.terms()]  # fail at construction on a bad loss_type
        if config.label_smoothing and "sigmoid" in names and not config.conservative:
            warnings.warn("label_smoothing has no effect on the sigmoid loss (as in TRL 1.16); set conservative=True "
                          "for conservative DPO, or use loss_type robust", stacklevel=2)

    def loss(self, batch: TextBatch) -> StepOutput:
        cfg = self.config
        policy, ref = self.lm.logprobs(batch.tokens), self.lm.logprobs(batch.tokens, reference=True)
        pw, pl = policy.sum.chunk(2)
        rw, rl = ref.sum.chunk(2)
        total, out = pw.new_zeros(()), None
        for loss_type, w in cfg.terms():
            if loss_type == "sft":
                total = total + w * _chosen_nll(policy, batch.weights, cfg.sft_average)
                continue
            if loss_type == "ipo":
                mw, ml = policy.mean.chunk(2)
                rmw, rml = ref.mean.chunk(2)
                term = dpo_loss(mw, ml, rmw, rml, beta=cfg.beta, loss_type="ipo").losses
            else:
                smoothing = cfg.label_smoothing if loss_type == "robust" or cfg.conservative else 0.0
                out = dpo_loss(pw, pl, rw, rl, beta=cfg.beta, loss_type=loss_type, label_smoothing=smoothing)
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
    """SimPO: reference-free, length-normalised (TRL 1.16's ``CPOTrainer(loss_type="simpo")``).

    Attributes:
        beta: 2.0 (the SimPO paper's range is about 2–10; TRL's CPO default 0.1 is not a SimPO value,
            so this default differs from TRL's on purpose: set 0.1 for TRL's).
        gamma: target margin γ (TRL's ``simpo_gamma`` 0.5).
        label_smoothing: ε (as TRL's).
        sft_weight: weight of the chosen completions' NLL (TRL's ``cpo_alpha``; 0 = pure SimPO,
            > 0 = CPO-SimPO).
        sft_average: ``"tokens"`` (TRL's: the mean over every chosen completion token of the batch)
            or ``"sequences"`` (the mean over pairs of per-sequence token means).
    """

    beta: float = 2.0
    gamma: float = 0.5
    label_smoothing: float = 0.0
    sft_weight: float = 0.0
    sft_average: str = "tokens"

    def __post_init__(self):
        super().__post_init__()
        _check_average(self.sft_average)


@register_method("text-simpo", TextSimPOConfig, kind="text")
class TextSimPO(TextMethod):
    uses_reference = False
    trl_tokenization = "cpo"

    def loss(self, batch: TextBatch) -> StepOutput:
        cfg = self.config
        policy = self.lm.logprobs(batch.tokens)
        mw, ml = policy.mean.chunk(2)
        out = simpo_loss(mw, ml, beta=cfg.beta, gamma=cfg.gamma, label_smoothing=cfg.label_smoothing)
        total = weighted_mean(out.losses, batch.weights)
        if cfg.sft_weight:
            total = total + cfg.sft_weight * _chosen_nll(policy, batch.weights, cfg.sft_average)
        return StepOutput(total, _preference_metrics(out, policy.sum.chunk(2)[0], policy.sum.chunk(2)[1]))


@dataclass
class TextORPOConfig(TextConfig):
    """ORPO: reference-free; the chosen NLL plus λ times the log odds-ratio term (TRL 1.16's
    ``ORPOTrainer``).

    Attributes:
        beta: λ (TRL's ORPO ``beta``, default 0.1).
        nll: the NLL term: ``"full_sequence"`` (TRL's: cross-entropy over every token of prompt +
            chosen completion after the first, the mean over every such token of the batch) or
            ``"completion_mean"`` (completion tokens only, per-sequence mean, then the mean over
            pairs: ``orpo_loss``'s ``−ℓ̄w``).
    """

    beta: float = 0.1
    nll: str = "full_sequence"

    def __post_init__(self):
        super().__post_init__()
        if self.nll not in ("full_sequence", "completion_mean"):
            raise ValueError(f"nll must be 'full_sequence' or 'completion_mean', not {self.nll!r}")


@register_method("text-orpo", TextORPOConfig, kind="text")
class TextORPO(TextMethod):
    uses_reference = False
    trl_tokenization = "cpo"

    def loss(self, batch: TextBatch) -> StepOutput:
        policy = self.lm.logprobs(batch.tokens)
        mw, ml = policy.mean.chunk(2)
        out = orpo_loss(mw, ml, beta=self.config.beta)
        if self.config.nll == "completion_mean":
            nll = weighted_mean(-mw, batch.weights)
        else:
            full_sum, _ = policy.full_sum.chunk(2)
            full_n, _ = policy.full_num_tokens.chunk(2)
            nll = _token_mean_nll(full_sum, full_n, batch.weights)
        odds_term = weighted_mean(-self.config.beta * F.logsigmoid(out.logits), batch.weights)
        metrics = _preference_metrics(out, *policy.sum.chunk(2))
        metrics["nll"] = nll.detach()
        return StepOutput(nll + odds_term, metrics)


def build_text_method(section, lm) -> TextMethod:
    """A recipe's method section (:class:`~diffalign.trainers.config.MethodSection`, as
    ``diffalign.trainers.registry.load_recipe`` builds it) → its text method (registered with
    ``kind="text"``) on ``lm``, with a copy of its checked config dataclass."""
    if section.kind != "text":
        text = sorted(n for n, e in REGISTERED.items() if e.kind == "text")
        raise ValueError(f"method {section.name!r} is not a text method (its kind is {section.kind!r}); "
                         f"text methods: {text}")
    return section.build(lm)
