"""Combining rewards: a normalised weighted sum, and Pref-GRPO's pairwise win-rate reward.

Weighted sum::

    r(x, c) = Σ_k w_k · (s_k(x, c) − μ_k) / σ_k

with ``(μ_k, σ_k)`` the batch mean and std (``normalize="batch"``), the card's fixed
``normalization`` (``"card"``), user-given ``stats``, or none (``None``).

Win rate (Pref-GRPO): within a group of G images of one prompt, image i's reward is its win rate
against the others under a preference model, ``w_i = 1/(G−1) · Σ_{j≠i} P(i ≻ j)``, with
``P(i ≻ j) = 1[s_i > s_j] + ½·1[s_i = s_j]`` from scalar scores (or ``σ((s_i − s_j)/τ)`` with a
temperature), or any pairwise ``prefer(images_i, images_j, prompts) -> P(i ≻ j)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from diffalign.rewards.base import Images, RewardModel, to_tensor


def normalize_scores(scores: torch.Tensor, how: str | None = "batch", stats: tuple[float, float] | None = None,
                     eps: float = 1e-8) -> torch.Tensor:
    """``(s − μ) / σ`` of ``scores [B]``: ``how="batch"`` (z-score within the batch; all zeros for a
    constant batch), ``"fixed"`` with ``stats=(μ, σ)``, or ``None`` (unchanged)."""
    if how is None:
        return scores
    if how == "batch":
        if scores.numel() < 2:
            return scores - scores.mean()
        return (scores - scores.mean()) / (scores.std() + eps)
    if how == "fixed":
        if stats is None:
            raise ValueError("normalize 'fixed' needs stats=(mean, std)")
        return (scores - stats[0]) / stats[1]
    raise ValueError(f"normalize must be 'batch', 'fixed' or None, got {how!r}")


def weighted_sum(scores: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None,
                 normalize: str | None = "batch",
                 stats: Mapping[str, tuple[float, float]] | None = None) -> torch.Tensor:
    """``Σ_k w_k · normalise(s_k)`` over named score tensors ``[B]`` (default weights 1). With
    ``normalize="fixed"`` every reward needs an entry in ``stats``."""
    if not scores:
        raise ValueError("no scores to combine")
    weights = weights or {}
    total = None
    for name, s in scores.items():
        st = (stats or {}).get(name)
        if normalize == "fixed" and st is None:
            raise ValueError(f"no fixed (mean, std) for reward {name!r}; give stats or use normalize='batch'")
        term = float(weights.get(name, 1.0)) * normalize_scores(s.float(), normalize, st)
        total = term if total is None else total + term
    return total


class WeightedReward(RewardModel):
    """A weighted sum of rewards, each normalised (see :func:`weighted_sum`).

    Args:
        rewards: the reward models (their ``name`` keys the weights and stats).
        weights: per-name weight (default 1).
        normalize: "batch", "card" (each card's ``normalization: {mean, std}``), "fixed" (``stats``) or None.
    """

    name = "weighted"

    def __init__(self, rewards: Sequence[RewardModel], weights: Mapping[str, float] | None = None,
                 normalize: str | None = "batch", stats: Mapping[str, tuple[float, float]] | None = None):
        super().__init__(mode="exact", batch_size=10**9)
        self.rewards = torch.nn.ModuleList(rewards)
        self.weights, self.stats = dict(weights or {}), dict(stats or {})
        self.normalize = normalize
        if normalize == "card":
            for r in rewards:
                norm = r.card.normalization if r.card else None
                if not norm:
                    raise ValueError(f"reward {r.name!r} has no card normalization; use normalize='batch'")
                self.stats[r.name] = (float(norm["mean"]), float(norm["std"]))
        self.differentiable = all(r.differentiable for r in rewards)

    @RewardModel.mode.setter
    def mode(self, value: str) -> None:
        RewardModel.mode.fset(self, value)
        for r in getattr(self, "rewards", []):
            r.mode = value

    def _score(self, images: Images, prompts: list) -> torch.Tensor:
        scores = {r.name: r.score(images, prompts) for r in self.rewards}
        how = "fixed" if self.normalize == "card" else self.normalize
        return weighted_sum(scores, self.weights, how, self.stats)


def win_rates(scores: torch.Tensor, group_size: int, temperature: float | None = None) -> torch.Tensor:
    """Pref-GRPO win rates ``[B]`` from scalar scores ``[B]`` laid out as consecutive groups of
    ``group_size`` (one prompt each): ``1/(G−1) · Σ_{j≠i} P(i ≻ j)``; ties count ½."""
    if scores.numel() % group_size or group_size < 2:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size} (need >= 2)")
    s = scores.float().view(-1, group_size)
    diff = s[:, :, None] - s[:, None, :]                           # [N, G, G]: s_i - s_j
    p = torch.sigmoid(diff / temperature) if temperature else (diff > 0).float() + 0.5 * (diff == 0).float()
    p = p * (1 - torch.eye(group_size, device=s.device))           # drop j = i
    return (p.sum(-1) / (group_size - 1)).view(-1)


def win_rates_pairwise(images: Images, prompts: Sequence, group_size: int,
                       prefer: Callable[[Images, Images, list], torch.Tensor]) -> torch.Tensor:
    """Win rates ``[B]`` under a pairwise preference model ``prefer(imgs_a, imgs_b, prompts) ->
    P(a ≻ b) [n]``, asked for every ordered pair within each group (so order bias averages out:
    ``P(i ≻ j)`` is taken as ``½ (p(i, j) + 1 − p(j, i))``)."""
    n = len(images)
    if n % group_size or group_size < 2 or len(prompts) != n:
        raise ValueError(f"{n} images / {len(prompts)} prompts do not split into groups of {group_size}")
    idx_a, idx_b = [], []
    for g in range(0, n, group_size):
        for i in range(g, g + group_size):
            for j in range(g, g + group_size):
                if i != j:
                    idx_a.append(i)
                    idx_b.append(j)
    pick = (lambda idx: to_tensor(images)[idx]) if isinstance(images, torch.Tensor) else \
        (lambda idx: [images[k] for k in idx])
    p = prefer(pick(idx_a), pick(idx_b), [prompts[k] for k in idx_a]).float().cpu()
    table = torch.zeros(n, n)
    table[idx_a, idx_b] = p
    sym = 0.5 * (table + 1 - table.T)
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[idx_a, idx_b] = True
    return (sym * mask).sum(-1) / (group_size - 1)


class WinRateReward(RewardModel):
    """Pref-GRPO's reward: each image's win rate within its group (``group_size`` consecutive
    images share a prompt) under ``reward``'s scores (in [0, 1]). Not differentiable."""

    name = "win-rate"
    differentiable = False

    def __init__(self, reward: RewardModel, group_size: int, temperature: float | None = None):
        super().__init__(mode="exact", batch_size=10**9)
        self.reward, self.group_size, self.temperature = reward, group_size, temperature
        self.name = f"win-rate({reward.name})"

    def _score(self, images: Images, prompts: list) -> torch.Tensor:
        return win_rates(self.reward.score(images, prompts), self.group_size, self.temperature)
