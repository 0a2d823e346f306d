"""Paired comparison: hand-checkable win rates and differences, bootstrap CIs and their coverage."""

from __future__ import annotations

import numpy as np
import pytest

from diffalign.eval.compare import compare_rewards, paired_comparison


def test_all_wins():
    r = paired_comparison([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    assert r["win_rate"] == 1.0 and r["win_rate_ci95"] == (1.0, 1.0)
    assert r["mean_a"] == pytest.approx(3.0) and r["mean_b"] == pytest.approx(1.0)
    assert r["mean_diff"] == pytest.approx(2.0)
    assert 1.0 <= r["diff_ci95"][0] <= 2.0 <= r["diff_ci95"][1] <= 3.0  # resampled means of {1, 2, 3}
    assert (r["wins"], r["ties"], r["losses"]) == (3, 0, 0)


def test_ties_count_half():
    r = paired_comparison([1.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0])
    assert r["win_rate"] == pytest.approx((0.5 + 0.5 + 1 + 0) / 4)
    assert (r["wins"], r["ties"], r["losses"]) == (1, 2, 1)


def test_symmetric_is_even():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=200), rng.normal(size=200)
    a, b = np.concatenate([x, y]), np.concatenate([y, x])  # every pair appears both ways round
    r = paired_comparison(a, b)
    assert r["win_rate"] == pytest.approx(0.5) and r["mean_diff"] == pytest.approx(0.0)
    lo, hi = r["win_rate_ci95"]
    assert lo < 0.5 < hi and hi - lo < 0.2
    assert r["diff_ci95"][0] < 0 < r["diff_ci95"][1]


def test_reversed_roles_mirror():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0.2, 1, 50), rng.normal(0, 1, 50)
    ab, ba = paired_comparison(a, b), paired_comparison(b, a)
    assert ab["win_rate"] == pytest.approx(1 - ba["win_rate"])
    assert ab["mean_diff"] == pytest.approx(-ba["mean_diff"])


def test_ci_covers_the_truth_in_simulation():
    rng = np.random.default_rng(3)
    # b = a_latent + noise: diff ~ N(0.3, 1), so P(a > b) = Phi(0.3) = 0.6179
    true_diff, true_win = 0.3, 0.6179114221889526
    hits_diff = hits_win = 0
    trials = 100
    for t in range(trials):
        base = rng.normal(size=100)
        d = rng.normal(true_diff, 1.0, size=100)
        r = paired_comparison(base + d, base, n_boot=1000, seed=t)
        hits_diff += r["diff_ci95"][0] <= true_diff <= r["diff_ci95"][1]
        hits_win += r["win_rate_ci95"][0] <= true_win <= r["win_rate_ci95"][1]
    assert 0.88 <= hits_diff / trials <= 1.0
    assert 0.85 <= hits_win / trials <= 1.0


def test_deterministic_in_seed():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=30), rng.normal(size=30)
    assert paired_comparison(a, b, n_boot=200, seed=5) == paired_comparison(a, b, n_boot=200, seed=5)
    assert paired_comparison(a, b, n_boot=200, seed=5)["diff_ci95"] != paired_comparison(a, b, n_boot=200,
                                                                                          seed=6)["diff_ci95"]


def test_groups_resample_prompts_not_images():
    rng = np.random.default_rng(4)
    a, b = rng.normal(0.1, 1, 40), rng.normal(0, 1, 40)
    per_prompt = paired_comparison(a, b)
    # four identical seeds per prompt: no new information, so the interval must not shrink...
    four = paired_comparison(np.repeat(a, 4), np.repeat(b, 4), groups=np.repeat(np.arange(40), 4))
    assert four["mean_diff"] == pytest.approx(per_prompt["mean_diff"]) and four["n_prompts"] == 40
    width = lambda r: r["diff_ci95"][1] - r["diff_ci95"][0]  # noqa: E731
    assert width(four) == pytest.approx(width(per_prompt), rel=0.15)
    # ...whereas treating the 160 images as independent prompts would halve it
    naive = paired_comparison(np.repeat(a, 4), np.repeat(b, 4))
    assert width(naive) < 0.65 * width(per_prompt)


def test_bad_input():
    with pytest.raises(ValueError, match="3 for A, 2 for B"):
        paired_comparison([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="no scores"):
        paired_comparison([], [])
    with pytest.raises(ValueError, match="non-finite"):
        paired_comparison([1.0, float("nan")], [1.0, 2.0])
    with pytest.raises(ValueError, match="groups"):
        paired_comparison([1, 2], [1, 2], groups=[0])


def test_compare_rewards():
    out = compare_rewards({"pickscore": [2.0, 3.0], "aesthetic": [1.0, 1.0]},
                          {"pickscore": [1.0, 1.0], "aesthetic": [2.0, 2.0]})
    assert out["pickscore"]["win_rate"] == 1.0 and out["aesthetic"]["win_rate"] == 0.0
    with pytest.raises(KeyError, match="hps"):
        compare_rewards({"hps": [1.0]}, {})
