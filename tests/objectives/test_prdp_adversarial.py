"""PRDP's reward-difference loss and Adv-GRPO's discriminator loss / reward, by hand on small tensors."""

import pytest
import torch

from diffalign.objectives.adversarial import discriminator_reward, hinge_discriminator_loss
from diffalign.objectives.prdp import reward_difference_loss


def test_reward_difference_loss_by_hand():
    # one group of 3 trajectories at 2 steps; rewards 1, 0, 1 (a tie: pair (0, 2) carries nothing)
    lr = torch.tensor([[0.2, 0.4], [0.0, 0.2], [0.1, 0.1]])
    old = torch.tensor([[0.25, 0.25], [0.1, 0.1], [0.1, 0.1]])
    rewards = torch.tensor([1.0, 0.0, 1.0])
    out = reward_difference_loss(lr, old, rewards, group_size=3, beta=2.0, clip_range=0.1)
    # r̂ = mean over steps: 0.3, 0.1, 0.1; clipped per step to old ± 0.1: [0.2, 0.35] → 0.275, [0.0, 0.2] → 0.1, 0.1
    # pairs with R > 0: (0, 1) and (2, 1), target R/β = 0.5 each
    d01, d21 = 0.3 - 0.1, 0.1 - 0.1
    dc01, dc21 = 0.275 - 0.1, 0.0
    expected = [max((d01 - 0.5) ** 2, (dc01 - 0.5) ** 2), max((d21 - 0.5) ** 2, (dc21 - 0.5) ** 2)]
    assert out.losses.tolist() == pytest.approx(expected, abs=1e-7)
    assert out.predicted.tolist() == pytest.approx([d01, d21], abs=1e-7)
    assert out.target.tolist() == pytest.approx([0.5, 0.5])
    assert float(out.clipped_frac) == pytest.approx(1 / 6)  # only 0.4 → 0.35 was clipped


def test_reward_difference_loss_groups_are_separate_and_gradient_is_the_regression():
    lr = torch.zeros(4, 1, requires_grad=True)
    rewards = torch.tensor([0.0, 3.0, 5.0, 1.0])          # groups (0, 1) and (2, 3)
    out = reward_difference_loss(lr, torch.zeros(4, 1), rewards, group_size=2, beta=1.0, clip_range=0.0)
    assert sorted(out.target.tolist()) == [3.0, 4.0]       # never a pair across groups
    out.losses.mean().backward()
    # L = ½[(l1 − l0 − 3)² + (l2 − l3 − 4)²] at 0 (the clipped branch has no gradient and the same value)
    assert lr.grad.flatten().tolist() == pytest.approx([3.0, -3.0, -4.0, 4.0])


def test_reward_difference_loss_bad_shapes():
    with pytest.raises(ValueError, match="multiple of group_size"):
        reward_difference_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(3), group_size=2, beta=1.0,
                               clip_range=0.1)
    with pytest.raises(ValueError, match="beta must be > 0"):
        reward_difference_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2), group_size=2, beta=0.0,
                               clip_range=0.1)


def test_hinge_discriminator_loss_by_hand():
    real_cls, fake_cls = torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0, 1.0])
    real_p, fake_p = torch.tensor([[0.0, 1.5]]).expand(2, 2), torch.tensor([[-0.5, -2.0]]).expand(3, 2)
    loss, terms = hinge_discriminator_loss(real_cls, fake_cls, real_p, fake_p, patch_weight=0.3)
    cls = 0.5 * ((0 + 0.5) / 2 + (0 + 1 + 2) / 3)           # ReLU(1 − real), ReLU(1 + fake)
    patch = 0.5 * ((1 + 0) / 2 + (0.5 + 0) / 2)
    assert float(loss) == pytest.approx(cls + 0.3 * patch)
    assert float(terms["cls_loss"]) == pytest.approx(cls) and float(terms["patch_loss"]) == pytest.approx(patch)
    assert float(terms["accuracy"]) == pytest.approx(0.5 * (1.0 + 1 / 3))
    only_cls, _ = hinge_discriminator_loss(real_cls, fake_cls)
    assert float(only_cls) == pytest.approx(cls)


def test_discriminator_reward_by_hand():
    r = discriminator_reward(torch.tensor([1.0, -1.0]), torch.tensor([[0.0, 2.0], [4.0, 0.0]]), cls_weight=0.7)
    assert r.tolist() == pytest.approx([0.7 + 0.3 * 1.0, -0.7 + 0.3 * 2.0])
