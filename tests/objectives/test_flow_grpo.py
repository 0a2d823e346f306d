"""GRPO-Guard's RatioNorm and gradient reweighting, by hand (diffalign.objectives.flow_grpo)."""

import math

import pytest
import torch

from diffalign.core.sampling import gaussian_log_prob
from diffalign.objectives.flow_grpo import grpo_guard_loss, ratio_norm_log_ratio
from diffalign.objectives.online import ppo_clip_loss


def test_ratio_norm_by_hand_one_element():
    # s = 0.5, μ_old = 0, μ_θ = 0.1, x' = 0.3 (z = 0.6):
    # Δlog π = (−(0.3 − 0.1)² + 0.3²) / (2·0.25) = 0.1; bias = 0.1² / 0.5 = 0.02; (0.1 + 0.02)·0.5 = 0.06 = z·Δμ
    s = torch.tensor([0.5])
    x, mu_old, mu = (torch.tensor([[v]]) for v in (0.3, 0.0, 0.1))
    logp, logp_old = gaussian_log_prob(x, mu, s.view(1, 1)), gaussian_log_prob(x, mu_old, s.view(1, 1))
    torch.testing.assert_close(logp - logp_old, torch.tensor([0.1]))
    torch.testing.assert_close(ratio_norm_log_ratio(logp, logp_old, mu, mu_old, s), torch.tensor([0.06]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ratio_norm_is_the_noise_times_the_mean_shift(reduction):
    """With x' = μ_old + s z: (Δlog π + R[Δμ²]/(2s²))·s = R[z·Δμ] for every sample, its own s each."""
    g = torch.Generator().manual_seed(0)
    s = torch.tensor([0.3, 0.05, 0.8]).view(3, 1, 1, 1)
    mu_old = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    mu = mu_old + 0.01 * torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    z = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    x = mu_old + s * z
    logp, logp_old = gaussian_log_prob(x, mu, s, reduction), gaussian_log_prob(x, mu_old, s, reduction)
    red = (z * (mu - mu_old)).flatten(1)
    expected = red.mean(1) if reduction == "mean" else red.sum(1)
    torch.testing.assert_close(ratio_norm_log_ratio(logp, logp_old, mu, mu_old, s, reduction).double(), expected,
                               rtol=1e-4, atol=1e-7)


def test_ratio_norm_fixes_the_mean_ratio_below_one():
    """Over x' ~ π_old, the mean-reduced ratio has E[ρ] = exp(−m(1 − 1/D)/(2s²)) < 1 (m = mean Δμ², D
    elements: flow_grpo issue #247's hypothesis); RatioNorm's has E[ρ̃] = exp(m/(2D)), i.e. ≈ 1."""
    N, D, s = 200_000, 16, 0.1
    g = torch.Generator().manual_seed(1)
    mu_old = torch.zeros(1, D, dtype=torch.float64)
    mu = mu_old + 0.05 * torch.randn(1, D, generator=g, dtype=torch.float64)
    m = float(((mu - mu_old) ** 2).mean())
    x = mu_old + s * torch.randn(N, D, generator=g, dtype=torch.float64)
    std = torch.full((N, 1), s, dtype=torch.float64)
    logp, logp_old = gaussian_log_prob(x, mu.expand(N, D), std), gaussian_log_prob(x, mu_old.expand(N, D), std)
    raw = (logp - logp_old).exp().mean()
    norm = ratio_norm_log_ratio(logp, logp_old, mu.expand(N, D), mu_old.expand(N, D), std.flatten()).exp().mean()
    assert math.exp(-m * (1 - 1 / D) / (2 * s**2)) < 0.96  # a clear bias below 1
    assert float(raw) == pytest.approx(math.exp(-m * (1 - 1 / D) / (2 * s**2)), rel=0.01)
    assert float(norm) == pytest.approx(math.exp(m / (2 * D)), abs=1e-4) and abs(float(norm) - 1) < 1e-3


def test_grpo_guard_loss_by_hand():
    # two transitions of one element each: s = (0.5, 0.2), dt = (−0.1, −0.25), A = (1, −2)
    s = torch.tensor([0.5, 0.2])
    mu_old = torch.tensor([[0.0], [0.0]])
    mu = torch.tensor([[0.1], [-0.02]], requires_grad=True)
    x = torch.tensor([[0.3], [0.1]])
    dt, adv = torch.tensor([-0.1, -0.25]), torch.tensor([1.0, -2.0])
    logp = gaussian_log_prob(x, mu, s.view(2, 1))
    logp_old = gaussian_log_prob(x, mu_old, s.view(2, 1))
    # normalised log-ratios z·Δμ: 0.6·0.1 = 0.06 and 0.5·(−0.02) = −0.01
    clip = 0.03
    losses, ratio = grpo_guard_loss(logp, logp_old, mu, mu_old, s, dt, adv, clip_range=clip)
    r = torch.tensor([math.exp(0.06), math.exp(-0.01)])
    torch.testing.assert_close(ratio, r)
    # A > 0, ρ̃ > 1 + ε: max(−ρ̃, −(1 + ε)) = −1.03; A < 0, ρ̃ inside the band: 2ρ̃; each divided by |dt|
    expected = torch.tensor([-(1 + clip) / 0.1, 2 * math.exp(-0.01) / 0.25])
    torch.testing.assert_close(losses, expected)
    losses.sum().backward()
    # the first is clipped (no gradient); the second: d(2ρ̃/0.25)/dμ = 8ρ̃·z with z = 0.5
    torch.testing.assert_close(mu.grad, torch.tensor([[0.0], [8 * math.exp(-0.01) * 0.5]]))
    # without the two pieces it is Flow-GRPO's PPO clip
    plain, plain_ratio = grpo_guard_loss(logp.detach(), logp_old, mu.detach(), mu_old, s, dt, adv, clip_range=clip,
                                         ratio_norm=False, reweight=False)
    ref, ref_ratio = ppo_clip_loss(logp.detach(), logp_old, adv, clip)
    assert torch.equal(plain, ref) and torch.equal(plain_ratio, ref_ratio)
    # on-policy: exactly 1
    _, one = grpo_guard_loss(logp_old, logp_old, mu_old, mu_old, s, dt, adv, clip_range=clip)
    assert (one == 1).all()


def test_ratio_norm_refuses_deterministic_steps():
    with pytest.raises(ValueError, match="std > 0"):
        ratio_norm_log_ratio(torch.zeros(2), torch.zeros(2), torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.1, 0.0]))
