import math

import pytest
import torch
from structured_helpers import (
    assert_ln2_at_init_with_gradient,
    beta_scaled_tolerance,
    group_batch,
    lora_grad_norm,
    move_lora,
    swap_groups,
    tiny_backbone,
)

from diffalign.core.inversion import invert
from diffalign.core.likelihood import denoising_error
from diffalign.trainers import build_method

PROMPTS = [["a red hat", "a blue cat"], ["a red hat", "a blue cat"]]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("smpo") / "sd")


def test_smoothed_beta_and_renoise_by_hand(backbone):
    move_lora(backbone, 0.05)
    try:
        scores = [0.30, 0.25, 0.10, 0.25]  # winners 0.30, 0.25; losers 0.10, 0.25 (a tie)
        batch = group_batch(backbone, PROMPTS, scores=scores, t=[600, 250])
        out = build_method({"name": "smpo", "beta": 2000.0, "num_inversion_steps": 5}, backbone).loss(batch)
        inv = invert(backbone, batch.latents, batch.timesteps, batch.cond, model="policy", num_steps=5,
                     renoise_steps=1)
        with torch.no_grad():
            lp = denoising_error(backbone.predict(inv.x_t, batch.timesteps, batch.cond), inv.target)
            with backbone.reference():
                lr = denoising_error(backbone.predict(inv.x_t, batch.timesteps, batch.cond), inv.target)
        h = -0.5 * ((lp[:2] - lp[2:]) - (lr[:2] - lr[2:]))
        p = math.exp(0.30) / (math.exp(0.30) + math.exp(0.10))
        kappa = torch.tensor([10 * (2 * p - 1), 0.0])
        expect = float(-torch.nn.functional.logsigmoid(2000.0 * kappa.double() * h.double()).mean())
        tol = beta_scaled_tolerance(2000.0 * float(kappa.abs().max()), lp, lr)
        assert float(out.loss) == pytest.approx(expect, abs=tol)
        assert float(out.metrics["beta_scale"]) == pytest.approx(float(kappa.mean()), rel=1e-5)
        # swapping images and scores together leaves the loss unchanged: the scores decide the direction
        swapped = build_method({"name": "smpo", "beta": 2000.0, "num_inversion_steps": 5}, backbone)
        assert float(swapped.loss(swap_groups(batch)).loss) == pytest.approx(float(out.loss), abs=tol)
    finally:
        move_lora(backbone, 0.0)


def test_ln2_at_init_equal_scores_give_no_gradient(backbone):
    method = build_method({"name": "smpo", "num_inversion_steps": 5}, backbone)
    assert_ln2_at_init_with_gradient(backbone, method.loss(group_batch(backbone, PROMPTS, scores=[0.3, 0.2, 0.1, 0.1])))
    tie = method.loss(group_batch(backbone, PROMPTS, scores=[0.2, 0.2, 0.2, 0.2]))
    tie.loss.backward()
    assert lora_grad_norm(backbone) == 0
    backbone.raw_denoiser.zero_grad()


def test_needs_scores(backbone):
    method = build_method({"name": "smpo", "num_inversion_steps": 2}, backbone)
    with pytest.raises(ValueError, match="score_0/score_1"):
        method.loss(group_batch(backbone, PROMPTS))
    with pytest.raises(ValueError, match="score_0/score_1"):
        method.loss(group_batch(backbone, PROMPTS, scores=[0.1, float("nan"), 0.2, 0.3]))
