import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.core.likelihood import denoising_error, elbo_loglik
from diffalign.objectives import dpo_loss, kto_loss, mapo_loss, mapo_odds


def test_dpo_matches_official_diffusion_dpo_formula():
    # errors of policy and reference for 3 pairs (hand-picked numbers)
    lw, ll = torch.tensor([0.10, 0.20, 0.30]), torch.tensor([0.12, 0.18, 0.30])
    rw, rl = torch.tensor([0.11, 0.19, 0.31]), torch.tensor([0.11, 0.19, 0.29])
    beta = 5000.0
    out = dpo_loss(elbo_loglik(lw), elbo_loglik(ll), elbo_loglik(rw), elbo_loglik(rl), beta=beta)
    inside = -0.5 * beta * ((lw - ll) - (rw - rl))  # official DiffusionDPO train.py
    torch.testing.assert_close(out.losses, -F.logsigmoid(inside))
    torch.testing.assert_close(out.logits, inside)
    # first pair by hand: inside = -2500 * ((-0.02) - 0) = 50 -> loss ~ exp(-50)
    assert out.losses[0].item() == pytest.approx(math.log1p(math.exp(-50.0)), rel=1e-4)


def test_dpo_at_initialisation_is_ln2_with_nonzero_gradient():
    policy = torch.nn.Parameter(torch.tensor([0.3, 0.5]))  # per-sample errors of winner, loser
    lw, ll = policy[0:1], policy[1:2]
    out = dpo_loss(elbo_loglik(lw), elbo_loglik(ll), elbo_loglik(lw.detach()), elbo_loglik(ll.detach()), beta=5000.0)
    assert out.losses.item() == pytest.approx(math.log(2), abs=1e-7)
    out.losses.mean().backward()
    # d/dLw of -logsig(-0.5 b (Lw - Ll - c)) at the origin = 0.5 * 0.5 * b
    assert policy.grad.tolist() == pytest.approx([0.25 * 5000, -0.25 * 5000])


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_variants_hand_values(loss_type):
    pw, pl, rw, rl = (torch.tensor([v]) for v in (-1.0, -2.0, -1.5, -1.5))
    h = (-1.0 + 1.5) - (-2.0 + 1.5)  # = 1.0
    beta, eps = 0.5, 0.1
    out = dpo_loss(pw, pl, rw, rl, beta=beta, loss_type=loss_type, label_smoothing=eps if loss_type == "robust" else 0.0)
    z = beta * h
    expected = {
        "sigmoid": math.log1p(math.exp(-z)),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": max(0.0, 1 - z),
        "robust": ((1 - eps) * math.log1p(math.exp(-z)) - eps * math.log1p(math.exp(z))) / (1 - 2 * eps),
    }[loss_type]
    assert out.losses.item() == pytest.approx(expected, rel=1e-6)


def test_conservative_dpo_label_smoothing_and_per_pair_beta():
    pw, pl, rw, rl = (torch.tensor([v, v]) for v in (0.0, -1.0, 0.0, 0.0))
    out = dpo_loss(pw, pl, rw, rl, beta=2.0, label_smoothing=0.2, beta_per_pair=torch.tensor([1.0, 3.0]))
    for i, b in enumerate([1.0, 3.0]):
        expected = 0.8 * math.log1p(math.exp(-b)) + 0.2 * math.log1p(math.exp(b))
        assert out.losses[i].item() == pytest.approx(expected, rel=1e-6)


def test_unknown_loss_type_is_a_clear_error():
    x = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown DPO loss type"):
        dpo_loss(x, x, x, x, beta=1.0, loss_type="cpo")


def test_kto_hand_values():
    policy, ref = torch.tensor([-1.0, -1.0]), torch.tensor([-1.5, -0.5])  # implicit rewards +0.5, -0.5
    desirable = torch.tensor([True, False])
    losses, z0 = kto_loss(policy, ref, desirable, beta=2.0)
    assert z0.item() == 0.0  # mean reward 0 → clamped reference point 0
    assert losses[0].item() == pytest.approx(1 - 1 / (1 + math.exp(-1.0)))  # 1 - σ(2·0.5)
    assert losses[1].item() == pytest.approx(1 - 1 / (1 + math.exp(-1.0)))  # 1 - σ(-2·(-0.5))


def test_mapo_matches_original_formula():
    lw, ll = torch.tensor([0.2, 0.5]), torch.tensor([0.4, 0.1])
    losses, logits = mapo_loss(lw, ll, beta=0.1, snr_value=0.5, num_train_timesteps=1000)
    f = lambda x: 0.5 * x / (math.exp(0.5 * x) - 1)  # noqa: E731
    for i in range(2):
        lo = 1000 * (f(lw[i].item()) - f(ll[i].item()))
        assert logits[i].item() == pytest.approx(lo, rel=1e-5)
        assert losses[i].item() == pytest.approx(lw[i].item() - 0.1 * -math.log1p(math.exp(-lo)), rel=1e-5, abs=1e-6)
    assert mapo_odds(torch.tensor([0.0])).item() == 1.0  # f(0) = 1, no NaN


def test_denoising_error_mean_and_mask():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [3.0, 3.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])
    assert denoising_error(pred, target).tolist() == [5.0, 1.0]
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])  # top row only
    assert denoising_error(pred, target, mask).tolist() == [1.0, 0.0]
