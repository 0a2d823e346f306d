import math

import pytest
import torch
import torch.nn.functional as F

from diffalign.trainers.dpo import DiffusionDPOConfig, diffusion_dpo_loss


def test_weighted_dpo_plus_sft_matches_hand_computation():
    policy = torch.tensor([0.10, 0.30, 0.20, 0.25])  # errors: winners [0.10, 0.30], losers [0.20, 0.25]
    ref = torch.tensor([0.12, 0.28, 0.18, 0.27])
    weights = torch.tensor([1.0, 3.0])
    cfg = DiffusionDPOConfig(beta=100.0, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    out = diffusion_dpo_loss(policy, ref, weights, cfg)
    inside = -0.5 * 100.0 * ((policy[:2] - policy[2:]) - (ref[:2] - ref[2:]))
    dpo = (-F.logsigmoid(inside) * weights).sum() / weights.sum()
    sft = (policy[:2] * weights).sum() / weights.sum()
    assert out.loss.item() == pytest.approx((dpo + 0.5 * sft).item(), rel=1e-6)
    # inside = [-50*(-0.1 - (-0.06)), -50*(0.05 - 0.01)] = [2, -2]
    assert out.metrics["implicit_acc"].item() == 0.5
    assert out.metrics["reward_margin"].item() == pytest.approx(0.0, abs=1e-5)


def test_dpo_loss_at_equal_policy_and_reference_is_ln2():
    e = torch.tensor([0.3, 0.1, 0.2, 0.4])
    out = diffusion_dpo_loss(e, e.clone(), torch.ones(2), DiffusionDPOConfig())
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert out.metrics["implicit_acc"].item() == 0.5
