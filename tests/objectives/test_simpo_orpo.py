import math

import pytest
import torch

from diffalign.objectives import log1mexp, orpo_loss, simpo_loss


def _logsig(x):
    return -math.log1p(math.exp(-x))


def test_simpo_hand_values():
    mw, ml = torch.tensor([-0.5, -2.0]), torch.tensor([-1.0, -1.0])
    out = simpo_loss(mw, ml, beta=2.0, gamma=0.5)
    # pair 0: z = 2*(0.5) - 0.5 = 0.5; pair 1: z = 2*(-1) - 0.5 = -2.5
    assert out.logits.tolist() == pytest.approx([0.5, -2.5])
    assert out.losses.tolist() == pytest.approx([-_logsig(0.5), -_logsig(-2.5)], rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([-1.0, -4.0])
    smoothed = simpo_loss(mw, ml, beta=2.0, gamma=0.5, label_smoothing=0.1)
    assert smoothed.losses[0].item() == pytest.approx(-0.9 * _logsig(0.5) - 0.1 * _logsig(-0.5), rel=1e-6)


def test_orpo_hand_values():
    mw, ml = torch.tensor([-0.2]), torch.tensor([-1.5])
    out = orpo_loss(mw, ml, beta=0.1)
    odds_w = -0.2 - math.log(1 - math.exp(-0.2))
    odds_l = -1.5 - math.log(1 - math.exp(-1.5))
    z = odds_w - odds_l
    assert out.logits.item() == pytest.approx(z, rel=1e-6)
    # the NLL of the chosen sample plus lambda * the odds-ratio term (sign: minimising raises the odds ratio)
    assert out.losses.item() == pytest.approx(0.2 - 0.1 * _logsig(z), rel=1e-6)
    p = torch.tensor([-0.2], requires_grad=True)
    orpo_loss(p, ml, beta=0.1).losses.sum().backward()
    assert p.grad.item() < 0  # gradient descent raises the chosen log-prob


def test_log1mexp_stable_on_both_branches():
    x = torch.tensor([-1e-5, -0.1, -0.69, -0.7, -5.0, -50.0], dtype=torch.float64)
    expect = torch.log(1 - torch.exp(x))
    torch.testing.assert_close(log1mexp(x), expect)
    assert math.isfinite(log1mexp(torch.tensor([0.0])).item())
