"""Preference pairs for a prompt rewriter, from images: rewrite → render → score → pair.

For each user prompt ``x`` (Promptist / Prompt-A-Video):

1. ``num_candidates`` rewrites are sampled from the rewriter (plus ``x`` itself when
   ``include_original``); duplicates are merged.
2. Each candidate is rendered ``images_per_candidate`` times by the text-to-image pipeline, with the
   same seeds for every candidate of ``x`` (paired noise), optionally with Parrot's
   original-centred guidance (:mod:`diffalign.text.guidance`).
3. Each image is scored by the reward models **against the original prompt** ``x`` (so a rewrite
   that drifts from what the user asked for loses fidelity reward), the rewards are combined with
   their weights (:func:`diffalign.rewards.combine.weighted_sum`) and averaged over a candidate's images.
4. Pairs: the best against the worst candidate (``pairing="best-worst"``) or every ordered pair
   (``"all"``), kept when the score margin exceeds ``min_margin`` (Prompt-A-Video keeps > 1.4 on its scale).
5. Sem-DPO (optional, ``semantic_alpha > 0``): each pair gets the weight
   ``exp(−α·(1 − cos(e(x), e(y_w))))``, ``e`` a text embedding (default: the T2I pipeline's own
   text encoder), so pairs whose chosen rewrite drifts in meaning count less.

Rows are TRL-format (``prompt`` is the rewriter's instruction for ``x``; ``chosen``/``rejected``
its completions) with ``original``, ``chosen_text``, ``rejected_text``, ``chosen_score``,
``rejected_score`` and ``weight``: ``diffalign rewrite train`` with ``text-dpo`` trains on them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from diffalign.text.rewriter import PromptRewriter, RewriteConfig

PAIRINGS = ("best-worst", "all")


@dataclass
class PairConfig:
    """How pairs are built (see the module docstring).

    Attributes:
        num_candidates: sampled rewrites per prompt (Prompt-A-Video: 5).
        include_original: the unrewritten prompt is a candidate too.
        images_per_candidate: images per candidate (Promptist: 2), seeds ``seed + 1000·i + j``.
        rewards: ``{reward name: weight}`` (``diffalign score --list``); every reward scores the image
            against the original prompt.
        reward_options: keyword arguments per reward name for ``load_reward``.
        normalize: how rewards are put on one scale before weighting: ``None`` (raw; right for one
            reward), ``"batch"`` (z-score over all images of the run).
        pairing: ``best-worst`` or ``all``.
        min_margin: keep a pair only when ``score_w − score_l > min_margin``.
        semantic_alpha: Sem-DPO's α (0 = every pair weight 1).
        guidance: ``rewrite`` (plain CFG on the rewrite) or ``original-centered`` (Parrot).
        original_weight: share of the guidance on the original prompt (original-centred only).
        num_inference_steps, guidance_scale, height, width: sampling.
        sampling: how candidates are sampled (``do_sample=True``: diverse rewrites).
    """

    num_candidates: int = 4
    include_original: bool = True
    images_per_candidate: int = 2
    seed: int = 0
    rewards: dict[str, float] = field(default_factory=lambda: {"shapes-eval": 1.0})
    reward_options: dict[str, dict] = field(default_factory=dict)
    normalize: str | None = None
    pairing: str = "best-worst"
    min_margin: float = 0.0
    semantic_alpha: float = 0.0
    guidance: str = "rewrite"
    original_weight: float = 0.5
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    height: int | None = None
    width: int | None = None
    sampling: RewriteConfig = field(default_factory=lambda: RewriteConfig(do_sample=True, temperature=1.0))

    def __post_init__(self):
        if isinstance(self.sampling, dict):
            self.sampling = RewriteConfig(**self.sampling)
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, not {self.pairing!r}")
        if self.semantic_alpha < 0:
            raise ValueError("semantic_alpha must be >= 0")


def candidate_lists(originals: Sequence[str], rewrites: Sequence[Sequence[str]], include_original: bool) -> list[list[str]]:
    """Per prompt: the original (if asked) then the distinct rewrites, in order of first appearance."""
    out = []
    for x, rs in zip(originals, rewrites):
        out.append(list(dict.fromkeys(([x] if include_original else []) + list(rs))))
    return out


@torch.no_grad()
def score_candidates(pipe, rewards: dict, originals: Sequence[str], candidates: Sequence[Sequence[str]],
                     cfg: PairConfig) -> list[list[float]]:
    """Mean combined reward of each candidate's images, scored against its original prompt:
    ``[len(originals)][len(candidates[i])]``. ``rewards``: ``{name: RewardModel}``."""
    from diffalign.rewards.combine import weighted_sum
    from diffalign.text.guidance import render_rewrites

    flat_orig, flat_rew, seeds, owner = [], [], [], []
    for i, (x, cands) in enumerate(zip(originals, candidates)):
        for k, c in enumerate(cands):
            for j in range(cfg.images_per_candidate):
                flat_orig.append(x)
                flat_rew.append(c)
                seeds.append(cfg.seed + 1000 * i + j)
                owner.append((i, k))
    images = render_rewrites(pipe, flat_orig, flat_rew, seeds, guidance=cfg.guidance,
                             num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale,
                             original_weight=cfg.original_weight, height=cfg.height, width=cfg.width)
    scores = {name: model.score(images, flat_orig).float().cpu() for name, model in rewards.items()}
    total = weighted_sum(scores, cfg.rewards, normalize=cfg.normalize)
    out = [[0.0] * len(c) for c in candidates]
    for (i, k), s in zip(owner, total.tolist()):
        out[i][k] += s / cfg.images_per_candidate
    return out


def select_pairs(scores: Sequence[float], pairing: str = "best-worst", min_margin: float = 0.0) -> list[tuple[int, int]]:
    """``(chosen, rejected)`` candidate indices of one prompt; ties and margins ``<= min_margin`` dropped.
    Best-worst takes the first of tied best / last of tied worst candidates."""
    n = len(scores)
    if n < 2:
        return []
    if pairing == "best-worst":
        best = max(range(n), key=lambda k: (scores[k], -k))
        worst = min(range(n), key=lambda k: (scores[k], -k))
        pairs = [(best, worst)]
    else:
        pairs = [(a, b) for a in range(n) for b in range(n) if scores[a] > scores[b]]
    return [(a, b) for a, b in pairs if scores[a] - scores[b] > min_margin]


def semantic_weights(embed: Callable[[list[str]], torch.Tensor], originals: Sequence[str], chosen: Sequence[str],
                     alpha: float) -> list[float]:
    """Sem-DPO weights ``exp(−α·(1 − cos(e(x), e(y_w))))`` ``[P]``; ``embed(texts) -> [N, D]``."""
    if alpha == 0 or not originals:
        return [1.0] * len(originals)
    e = embed(list(originals) + list(chosen)).float()
    e = torch.nn.functional.normalize(e, dim=-1)
    cos = (e[:len(originals)] * e[len(originals):]).sum(-1)
    return [math.exp(-alpha * (1 - c)) for c in cos.tolist()]


def pipeline_text_embedder(pipe) -> Callable[[list[str]], torch.Tensor]:
    """Text embeddings from the T2I pipeline's (first) text encoder: its pooled output ``[N, D]``
    (CLIP: the EOS token's final state), i.e. meaning as the image model reads it."""
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder

    @torch.no_grad()
    def embed(texts: list[str]) -> torch.Tensor:
        enc = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").to(encoder.device)
        return encoder(**enc).pooler_output.float().cpu()

    return embed


def build_pairs(rewriter: PromptRewriter, pipe, prompts: Sequence[str], cfg: PairConfig, *,
                rewards: dict | None = None, embed: Callable[[list[str]], torch.Tensor] | None = None,
                candidates: Sequence[Sequence[str]] | None = None) -> tuple[list[dict], dict]:
    """TRL-format pair rows for ``prompts`` and a summary (counts, mean scores).

    ``rewards`` (``{name: RewardModel}``) defaults to ``load_reward`` of ``cfg.rewards``; ``embed``
    to the pipeline's text encoder (used only with ``cfg.semantic_alpha > 0``); ``candidates``
    (per prompt) skips sampling them from the rewriter.
    """
    from diffalign.rewards import load_reward

    prompts = list(prompts)
    if rewards is None:
        rewards = {name: load_reward(name, **cfg.reward_options.get(name, {})) for name in cfg.rewards}
    if candidates is None:
        sampled = rewriter.rewrite(prompts, num_return_sequences=cfg.num_candidates, config=cfg.sampling)
        candidates = candidate_lists(prompts, sampled, cfg.include_original)
    scores = score_candidates(pipe, rewards, prompts, candidates, cfg)
    chosen_idx = []
    for i, s in enumerate(scores):
        chosen_idx.extend((i, a, b) for a, b in select_pairs(s, cfg.pairing, cfg.min_margin))
    if cfg.semantic_alpha and embed is None:
        embed = pipeline_text_embedder(pipe)
    weights = semantic_weights(embed, [prompts[i] for i, _, _ in chosen_idx],
                               [candidates[i][a] for i, a, _ in chosen_idx], cfg.semantic_alpha)
    rows = []
    for (i, a, b), w in zip(chosen_idx, weights):
        rows.append({"prompt": rewriter.training_prompt(prompts[i]),
                     "chosen": rewriter.completion(candidates[i][a]),
                     "rejected": rewriter.completion(candidates[i][b]),
                     "original": prompts[i], "chosen_text": candidates[i][a], "rejected_text": candidates[i][b],
                     "chosen_score": scores[i][a], "rejected_score": scores[i][b], "weight": w})
    flat = [s for row in scores for s in row]
    summary = {"prompts": len(prompts), "candidates": len(flat), "pairs": len(rows),
               "mean_candidate_score": sum(flat) / max(1, len(flat)),
               "mean_original_score": (sum(s[0] for s in scores) / max(1, len(scores))) if cfg.include_original
               else None,
               "mean_best_score": sum(max(s) for s in scores) / max(1, len(scores))}
    return rows, summary
