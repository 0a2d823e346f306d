"""Paired comparison of two models scored on the same prompts and seeds, with bootstrap CIs.

Image ``i`` of model A and image ``i`` of model B share their prompt and seed, so the comparison
is on the pairs: the mean difference of their scores and A's win rate (a tie counts one half).
Confidence intervals are percentile bootstrap intervals that resample *prompts*: with several
seeds per prompt, pass ``groups`` (the prompt of each pair) so that a prompt's images are resampled
together; otherwise each pair is its own prompt.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np


def _as_scores(x: Sequence[float], name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} holds {int((~np.isfinite(a)).sum())} non-finite scores")
    return a


def _group_index(groups: Sequence[Hashable] | None, n: int) -> tuple[np.ndarray, int]:
    if groups is None:
        return np.arange(n), n
    if len(groups) != n:
        raise ValueError(f"{len(groups)} groups for {n} score pairs")
    ids: dict[Hashable, int] = {}
    return np.array([ids.setdefault(g, len(ids)) for g in groups]), len(ids)


def _bootstrap_ci(values: np.ndarray, index: np.ndarray, n_groups: int, n_boot: int,
                  rng: np.random.Generator) -> tuple[float, float]:
    """95 % percentile interval of the pooled mean of ``values`` over resampled groups."""
    sums = np.bincount(index, weights=values, minlength=n_groups)
    counts = np.bincount(index, minlength=n_groups).astype(np.float64)
    draws = rng.integers(0, n_groups, size=(n_boot, n_groups))
    stats = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return float(lo), float(hi)


def paired_comparison(scores_a: Sequence[float], scores_b: Sequence[float], *, n_boot: int = 2000, seed: int = 0,
                      groups: Sequence[Hashable] | None = None) -> dict:
    """Compare model A with model B on paired scores (higher is better).

    Returns ``mean_a``, ``mean_b``, ``mean_diff`` (mean of ``a - b``) with ``diff_ci95``,
    ``win_rate`` (share of pairs where A scores higher, ties counting 0.5) with ``win_rate_ci95``,
    and ``n``, ``n_prompts``, ``wins``, ``ties``, ``losses``. The intervals come from ``n_boot``
    bootstrap resamples of the prompts (``groups``), deterministic in ``seed``.
    """
    a, b = _as_scores(scores_a, "scores_a"), _as_scores(scores_b, "scores_b")
    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} for A, {len(b)} for B")
    if len(a) == 0:
        raise ValueError("no scores to compare")
    if n_boot < 1:
        raise ValueError(f"n_boot must be positive, got {n_boot}")
    index, n_groups = _group_index(groups, len(a))
    diff = a - b
    win = np.where(diff > 0, 1.0, np.where(diff < 0, 0.0, 0.5))
    rng = np.random.default_rng(seed)
    return {
        "mean_a": float(a.mean()),
        "mean_b": float(b.mean()),
        "mean_diff": float(diff.mean()),
        "diff_ci95": _bootstrap_ci(diff, index, n_groups, n_boot, rng),
        "win_rate": float(win.mean()),
        "win_rate_ci95": _bootstrap_ci(win, index, n_groups, n_boot, rng),
        "n": int(len(a)),
        "n_prompts": int(n_groups),
        "wins": int((diff > 0).sum()),
        "ties": int((diff == 0).sum()),
        "losses": int((diff < 0).sum()),
    }


def compare_rewards(scores_a: Mapping[str, Sequence[float]], scores_b: Mapping[str, Sequence[float]], *,
                    n_boot: int = 2000, seed: int = 0, groups: Sequence[Hashable] | None = None) -> dict[str, dict]:
    """:func:`paired_comparison` for each reward scored on both models (``{reward: scores}``)."""
    missing = sorted(set(scores_a) ^ set(scores_b))
    if missing:
        raise KeyError(f"rewards scored for only one model: {missing}")
    return {name: paired_comparison(scores_a[name], scores_b[name], n_boot=n_boot, seed=seed, groups=groups)
            for name in scores_a}
