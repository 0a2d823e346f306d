import math

import pytest
import torch

from diffalign.objectives import dpo_loss
from diffalign.objectives.ranked import (
    dcg_discounts,
    delta_dcg_weights,
    exponential_gains,
    ranked_dpo_loss,
    smoothed_beta_scale,
    smoothed_preference,
)


def test_dcg_weights_by_hand():
    torch.testing.assert_close(dcg_discounts(3), torch.tensor([1.0, 1 / math.log2(3), 0.5]))
    gains = exponential_gains(torch.tensor([[2.0, 1.0, 0.0]]))  # 2^ψ − 1 = 3, 1, 0
    torch.testing.assert_close(gains, torch.tensor([[3.0, 1.0, 0.0]]))
    w = delta_dcg_weights(gains)[0]
    d1 = 1 / math.log2(3)
    expect = torch.tensor([[0, 2 * (1 - d1), 3 * 0.5], [0, 0, 1 * (d1 - 0.5)], [0, 0, 0]], dtype=torch.float32)
    torch.testing.assert_close(w, expect)


def test_ranked_loss_of_two_is_dpo_and_ln2_at_init():
    g = torch.Generator().manual_seed(0)
    pol, ref = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    gains = torch.tensor([[1.0, 0.0]]).expand(4, 2)
    ranked = ranked_dpo_loss(pol, ref, gains, beta=3.0)
    dpo = dpo_loss(pol[:, 0], pol[:, 1], ref[:, 0], ref[:, 1], beta=3.0)
    torch.testing.assert_close(ranked.losses, dpo.losses)
    ref5 = torch.randn(4, 5, generator=g)
    same = ranked_dpo_loss(ref5, ref5, exponential_gains(torch.randn(4, 5, generator=g)), beta=5000.0)
    torch.testing.assert_close(same.losses, torch.full((4,), math.log(2)))


def test_ranked_loss_by_hand_and_reversed_order_flips_the_logits():
    pol, ref = torch.tensor([[0.3, 0.1, -0.2]]), torch.zeros(1, 3)
    gains = torch.tensor([[3.0, 1.0, 0.0]])
    out = ranked_dpo_loss(pol, ref, gains, beta=2.0, normalize=False)
    w = delta_dcg_weights(gains)[0]
    r = 2.0 * pol[0]
    by_hand = sum(float(w[i, j]) * -math.log(1 / (1 + math.exp(-(r[i] - r[j])))) for i in range(3) for j in range(i + 1, 3))
    assert float(out.losses[0]) == pytest.approx(by_hand, rel=1e-5)
    assert float(out.accuracy()) == 1.0
    rev = ranked_dpo_loss(pol.flip(1), ref, gains, beta=2.0)
    assert float(rev.accuracy()) == 0.0 and float(rev.losses[0]) > float(ranked_dpo_loss(pol, ref, gains, beta=2.0).losses[0])


def test_smoothed_scale_by_hand():
    sw, sl = torch.tensor([0.25, 0.2, 0.1]), torch.tensor([0.15, 0.2, 0.3])
    p = smoothed_preference(sw, sl, score_min=0.11543526, score_max=0.28201571)
    span = 0.28201571 - 0.11543526
    expect = math.exp(0.25 / span) / (math.exp(0.25 / span) + math.exp(0.15 / span))  # softmax, as SmPO
    assert float(p[0]) == pytest.approx(expect, rel=1e-5)
    k = smoothed_beta_scale(sw, sl, score_min=0.11543526, score_max=0.28201571)
    assert float(k[0]) == pytest.approx(10 * (2 * expect - 1), rel=1e-5)
    assert float(k[1]) == 0.0 and float(k[2]) < 0
    with pytest.raises(ValueError):
        smoothed_preference(sw, sl, score_min=1.0, score_max=1.0)
