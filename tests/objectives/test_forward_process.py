"""DiffusionNFT, AWM and DGPO objectives by hand on small tensors (values written out from the formulas
of their docstrings), their values and gradients at initialisation."""

import math

import pytest
import torch

from diffalign.objectives.forward_process import (
    awm_log_likelihood,
    awm_loss,
    dgpo_loss,
    nft_loss,
    nft_optimality,
)


# ------------------------------------------------------------------ DiffusionNFT
def test_nft_optimality_by_hand():
    a = torch.tensor([-7.0, -5.0, -1.0, 0.0, 2.5, 9.0])
    # clip(A, ±5)/5/2 + 0.5
    assert nft_optimality(a, 5.0).tolist() == pytest.approx([0.0, 0.0, 0.4, 0.5, 0.75, 1.0])


def _nft_inputs():
    # two samples of two elements each, shaped [b, 1, 1, 2]
    x_t = torch.tensor([[1.0, 2.0], [0.5, -1.0]]).view(2, 1, 1, 2)
    x0 = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).view(2, 1, 1, 2)
    target = torch.tensor([[2.0, 1.0], [-1.0, -2.0]]).view(2, 1, 1, 2)
    t = torch.tensor([0.5, 0.25])
    v_old = torch.tensor([[1.0, 1.0], [0.0, -2.0]]).view(2, 1, 1, 2)
    v = torch.tensor([[2.0, 0.0], [1.0, -2.0]]).view(2, 1, 1, 2)
    return x_t, x0, target, t, v_old, v


def test_nft_loss_x0_adaptive_by_hand():
    x_t, x0, target, t, v_old, v = _nft_inputs()
    r = torch.tensor([0.75, 0.25])
    losses, l_pos, l_neg = nft_loss(v, v_old, x_t, x0, target, t, r, beta=0.5, form="x0_adaptive", scale=5.0)
    # sample 0: v+ = .5 v + .5 v_old = [1.5, .5];  v- = 1.5 v_old - .5 v = [.5, 1.5]
    #   x̂0+ = x_t - .5 v+ = [.25, 1.75] -> err [.25, .75]: mse (.0625+.5625)/2 = .3125, mae .5 -> .625
    #   x̂0- = [.75, 1.25] -> err [.75, .25]: same .625
    # sample 1: v+ = [.5, -2], v- = [-.5, -2];  x̂0+ = [.5 - .125, -1 + .5] = [.375, -.5] -> err [-.625, -.5]
    #   mse (.390625 + .25)/2 = .3203125, mae .5625 -> .569444...
    #   x̂0- = [.625, -.5] -> err [-.375, -.5]: mse (.140625+.25)/2 = .1953125, mae .4375 -> .446428...
    assert l_pos.tolist() == pytest.approx([0.625, 0.3203125 / 0.5625])
    assert l_neg.tolist() == pytest.approx([0.625, 0.1953125 / 0.4375])
    expected = [5 * (0.75 * 0.625 + 0.25 * 0.625) / 0.5,
                5 * (0.25 * 0.3203125 / 0.5625 + 0.75 * 0.1953125 / 0.4375) / 0.5]
    assert losses.tolist() == pytest.approx(expected)


def test_nft_loss_velocity_form_by_hand():
    x_t, x0, target, t, v_old, v = _nft_inputs()
    r = torch.tensor([1.0, 0.0])
    losses, l_pos, l_neg = nft_loss(v, v_old, x_t, x0, target, t, r, beta=1.0, form="velocity", scale=5.0)
    # β = 1: v+ = v, v- = 2 v_old - v
    # sample 0: v+ - u = [0, -1] -> .5; v- = [0, 2] - u = [-2, 1] -> 2.5
    # sample 1: v+ - u = [2, 0] -> 2;   v- = [-1, -2] - u = [0, 0] -> 0
    assert l_pos.tolist() == pytest.approx([0.5, 2.0])
    assert l_neg.tolist() == pytest.approx([2.5, 0.0])
    assert losses.tolist() == pytest.approx([5 * 0.5, 5 * 0.0])


def test_nft_at_initialisation_the_policies_coincide():
    """θ = θ_old: L+ = L- whatever r, the loss is scale·L/β, and its gradient is scale·(2r − 1)·∂L
    (zero for r = ½)."""
    g = torch.Generator().manual_seed(0)
    x_t, x0, target, v_old = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(4))
    t = torch.tensor([0.9, 0.5, 0.2])
    r = torch.tensor([0.5, 0.9, 0.1])
    v = v_old.clone().requires_grad_(True)
    losses, l_pos, l_neg = nft_loss(v, v_old, x_t, x0, target, t, r, beta=0.1)
    torch.testing.assert_close(l_pos, l_neg)
    err = x_t - t.view(-1, 1, 1, 1) * v_old - x0
    plain = (err**2).flatten(1).mean(1) / err.abs().flatten(1).mean(1)
    torch.testing.assert_close(losses, 5 * plain / 0.1)
    losses.sum().backward()
    # ∂L/∂v of the self-normalised error at v_old (the weight is a constant)
    weight = err.abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    d_plain = 2 * err * (-t.view(-1, 1, 1, 1)) / err[0].numel() / weight
    expected = 5 * (2 * r.view(-1, 1, 1, 1) - 1) * d_plain  # β cancels: ±β·∂L/β
    torch.testing.assert_close(v.grad, expected)
    assert v.grad[0].abs().max() < 1e-6  # r = ½: no pull (up to the fp32 rounding of v± at β = 0.1)


def test_nft_rejects_bad_options():
    x_t, x0, target, t, v_old, v = _nft_inputs()
    with pytest.raises(ValueError, match="loss form"):
        nft_loss(v, v_old, x_t, x0, target, t, torch.ones(2), form="eps")
    with pytest.raises(ValueError, match="beta"):
        nft_loss(v, v_old, x_t, x0, target, t, torch.ones(2), beta=0.0)


# ------------------------------------------------------------------ AWM
def test_awm_weightings_by_hand():
    mse, t = torch.tensor([0.04, 1.0], dtype=torch.float64), torch.tensor([0.5, 0.25], dtype=torch.float64)
    assert awm_log_likelihood(mse, t, "uniform").tolist() == pytest.approx([-0.04, -1.0])
    assert awm_log_likelihood(mse, t, "t").tolist() == pytest.approx([-0.02, -0.25])
    assert awm_log_likelihood(mse, t, "t2").tolist() == pytest.approx([-0.01, -0.0625])
    huber = [-0.5 * (math.sqrt(0.04 + 1e-10) - 1e-5), -0.25 * (math.sqrt(1 + 1e-10) - 1e-5)]
    assert awm_log_likelihood(mse, t, "huber").tolist() == pytest.approx(huber, rel=1e-12)
    gh = [-0.5 * ((0.04 + 1e-10) ** 0.25 - 1e-10**0.25) / 0.25, -0.25 * ((1 + 1e-10) ** 0.25 - 1e-10**0.25) / 0.25]
    assert awm_log_likelihood(mse, t, "ghuber", 0.25).tolist() == pytest.approx(gh, rel=1e-12)
    with pytest.raises(ValueError, match="weighting"):
        awm_log_likelihood(mse, t, "sigmoid")


def test_awm_on_policy_is_advantage_weighted_matching():
    """ℓ_old = sg(ℓ): ρ = 1, the value is −Â and the gradient is Â·∂w(t, mse)."""
    mse = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.8, 0.4, 0.1])
    adv = torch.tensor([7.0, -2.5, 1.0])
    ell = awm_log_likelihood(mse, t, "t")
    losses, ratio = awm_loss(ell, ell.detach(), adv, clip_range=1e-5, adv_clip_max=5.0, advantage_max=1.0)
    a_hat = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)  # clip(A, ±5)/5
    assert ratio.tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(losses, -a_hat)
    losses.sum().backward()
    torch.testing.assert_close(mse.grad, a_hat * t.double())  # ∂(Â·t·mse)/∂mse


def test_awm_ratio_clip_by_hand():
    ell = torch.tensor([0.0, math.log(1.5), math.log(0.5)], dtype=torch.float64)
    losses, ratio = awm_loss(ell, torch.zeros(3, dtype=torch.float64), torch.tensor([5.0, 5.0, -5.0]),
                             clip_range=0.2, adv_clip_max=5.0, advantage_max=1.0)
    # Â = [1, 1, -1]: max(-1, -1) = -1; max(-1.5, -1.2) = -1.2; max(.5, .8) = .8
    assert losses.tolist() == pytest.approx([-1.0, -1.2, 0.8])
    assert ratio.tolist() == pytest.approx([1.0, 1.5, 0.5])


# ------------------------------------------------------------------ DGPO
def test_dgpo_loss_by_hand():
    policy = torch.tensor([1.0, 2.0, 0.5, 0.5], requires_grad=True)
    ref = torch.tensor([1.5, 1.0, 0.5, 1.0])
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0])
    groups = torch.tensor([0, 0, 1, 1])
    losses, s, group_dpo = dgpo_loss(policy, ref, adv, groups, beta=2.0, group_size=2)
    # s_0 = 2/2·(1·(1 − 1.5) + (−1)·(2 − 1)) = −1.5;  s_1 = 2/2·(2·0 + (−2)·(−0.5)) = 1
    assert s.tolist() == pytest.approx([-1.5, 1.0])
    sig = [1 / (1 + math.exp(1.5)), 1 / (1 + math.exp(-1.0))]
    assert losses.tolist() == pytest.approx([sig[0] * 1.0 * 1.0, sig[0] * -1.0 * 2.0, sig[1] * 2.0 * 0.5,
                                             sig[1] * -2.0 * 0.5])
    assert group_dpo.tolist() == pytest.approx([math.log(1 + math.exp(-1.5)), math.log(1 + math.exp(1.0))])
    # the weight is detached: ∂L_i/∂ℓ_i = σ(s_g)·A_i
    losses.sum().backward()
    assert policy.grad.tolist() == pytest.approx([sig[0], -sig[0], 2 * sig[1], -2 * sig[1]])


def test_dgpo_at_the_reference_is_ln2_with_weights_one_half():
    g = torch.Generator().manual_seed(1)
    errors = torch.rand(6, generator=g)
    adv = torch.randn(6, generator=g)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    losses, s, group_dpo = dgpo_loss(errors, errors.clone(), adv, groups, beta=100.0, group_size=3)
    assert s.tolist() == [0.0, 0.0]
    torch.testing.assert_close(group_dpo, torch.full((2,), math.log(2)))
    torch.testing.assert_close(losses, 0.5 * adv * errors)
    # group_size None: each group's size in the batch
    _, s2, _ = dgpo_loss(errors + 1, errors, adv, groups, beta=1.0)
    torch.testing.assert_close(s2, torch.stack([adv[:3].sum() / 3, adv[3:].sum() / 3]))
