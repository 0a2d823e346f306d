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

from diffalign.core.inversion import invert, reparametrised_target
from diffalign.core.likelihood import denoising_error
from diffalign.trainers import build_method

PROMPTS = [["a red hat", "a blue cat"], ["a red hat", "a blue cat"]]
STEPS = 5


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("invdpo") / "sd")


def test_non_zero_gradient_at_initialisation(backbone):
    backbone.raw_denoiser.zero_grad()
    out = build_method({"name": "inversion-dpo", "num_inversion_steps": STEPS}, backbone).loss(
        group_batch(backbone, PROMPTS))
    assert_ln2_at_init_with_gradient(backbone, out, min_grad_norm=1e-3)


def test_the_public_codes_target_has_zero_gradient_at_initialisation(backbone):
    """Why we depart from the code: with the reference's own prediction as the target, ``L_ref ≡ 0``
    and the policy's error and its gradient vanish while policy == reference."""
    backbone.raw_denoiser.zero_grad()
    batch = group_batch(backbone, PROMPTS)
    inv = invert(backbone, batch.latents, torch.full_like(batch.timesteps, 801), batch.cond, model="reference",
                 num_steps=STEPS, return_trajectory=True)
    d = 0.0
    for s in inv.trajectory:
        with torch.no_grad(), backbone.reference():
            eps_ref = backbone.predict(s.x, s.timesteps, batch.cond)
        d = d + denoising_error(backbone.predict(s.x, s.timesteps, batch.cond), eps_ref)
    dw, dl = d.chunk(2)
    loss = -torch.nn.functional.logsigmoid(0.5 * 2000.0 * (dw - dl) / STEPS).mean()  # the code's form and sign
    loss.backward()
    assert lora_grad_norm(backbone) == 0.0
    backbone.raw_denoiser.zero_grad()


def test_loss_by_hand_and_sign_follows_the_paper(backbone):
    move_lora(backbone, 0.05)
    try:
        batch = group_batch(backbone, PROMPTS)
        beta = 2000.0
        out = build_method({"name": "inversion-dpo", "num_inversion_steps": STEPS, "beta": beta}, backbone).loss(batch)
        top = torch.full_like(batch.timesteps, 801)  # the top of the 5-step grid (1, 201, ..., 801)
        inv = invert(backbone, batch.latents, top, batch.cond, model="reference", num_steps=STEPS,
                     return_trajectory=True)
        lp, lr = 0.0, 0.0
        with torch.no_grad():
            for s in inv.trajectory:
                _, target = reparametrised_target(backbone.forward_process, batch.latents, s.x, s.timesteps)
                lp = lp + denoising_error(backbone.predict(s.x, s.timesteps, batch.cond), target) / STEPS
                with backbone.reference():
                    lr = lr + denoising_error(backbone.predict(s.x, s.timesteps, batch.cond), target) / STEPS
        z = -0.5 * beta * ((lp[:2] - lp[2:]) - (lr[:2] - lr[2:])).double()  # DPO's sign: winners' error must fall
        tol = beta_scaled_tolerance(beta, lp, lr)
        assert float(out.loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(z).mean()), abs=tol)
        swapped = build_method({"name": "inversion-dpo", "num_inversion_steps": STEPS, "beta": beta},
                               backbone).loss(swap_groups(batch))
        assert float(swapped.loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(-z).mean()), abs=tol)
        assert abs(float(swapped.loss) - float(out.loss)) > 10 * tol
    finally:
        move_lora(backbone, 0.0)


def test_a_gradient_step_raises_the_margin(backbone):
    """Following the gradient makes the policy prefer the winners (the public code's + sign would not)."""
    method = build_method({"name": "inversion-dpo", "num_inversion_steps": STEPS, "beta": 2000.0}, backbone)
    batch = group_batch(backbone, PROMPTS, seed=5)
    params = backbone.trainable_parameters()
    saved = [p.detach().clone() for p in params]
    try:
        opt = torch.optim.SGD(params, lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            out = method.loss(batch)
            out.loss.backward()
            opt.step()
        after = method.loss(batch)
        assert float(after.metrics["reward_margin"]) > 0 and float(after.loss) < math.log(2)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
        backbone.raw_denoiser.zero_grad()


def test_steps_per_update_and_weighting(backbone):
    move_lora(backbone, 0.05, seed=4)
    try:
        batch = group_batch(backbone, PROMPTS)
        full = build_method({"name": "inversion-dpo", "num_inversion_steps": STEPS}, backbone).loss(batch)
        sub = build_method({"name": "inversion-dpo", "num_inversion_steps": STEPS, "steps_per_update": 2},
                           backbone).loss(batch)
        again = build_method({"name": "inversion-dpo", "num_inversion_steps": STEPS, "steps_per_update": 2},
                             backbone).loss(batch)
        w = build_method({"name": "inversion-dpo", "num_inversion_steps": STEPS, "step_weighting": "inverse_alpha"},
                         backbone).loss(batch)
        assert float(sub.loss) == float(again.loss) != float(full.loss)
        assert float(w.loss) != float(full.loss)
    finally:
        move_lora(backbone, 0.0)
    with pytest.raises(ValueError, match="step_weighting"):
        build_method({"name": "inversion-dpo", "step_weighting": "snr"}, backbone)
