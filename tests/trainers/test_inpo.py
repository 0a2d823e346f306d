import pytest
import torch
from structured_helpers import (
    assert_ln2_at_init_with_gradient,
    beta_scaled_tolerance,
    group_batch,
    move_lora,
    swap_groups,
    tiny_backbone,
)

from diffalign.core.inversion import invert
from diffalign.core.likelihood import denoising_error
from diffalign.trainers import build_method

PROMPTS = [["a red hat", "a blue cat", "a dog"], ["a red hat", "a blue cat", "a dog"]]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("inpo") / "sd")


def test_ln2_at_init_with_a_gradient(backbone):
    backbone.raw_denoiser.zero_grad()
    out = build_method({"name": "inpo"}, backbone).loss(group_batch(backbone, PROMPTS))
    assert float(out.metrics["implicit_acc"]) == 0.5
    assert_ln2_at_init_with_gradient(backbone, out)


def test_loss_is_dpo_on_the_inverted_latents_by_hand(backbone):
    move_lora(backbone, 0.05)
    try:
        batch = group_batch(backbone, PROMPTS, t=[700, 30, 420])
        beta = 5000.0
        out = build_method({"name": "inpo", "eta": 0.0, "beta": beta}, backbone).loss(batch)
        inv = invert(backbone, batch.latents, batch.timesteps, batch.cond, model="policy", num_steps=10)
        with torch.no_grad():
            lp = denoising_error(backbone.predict(inv.x_t, batch.timesteps, batch.cond), inv.target)
            with backbone.reference():
                lr = denoising_error(backbone.predict(inv.x_t, batch.timesteps, batch.cond), inv.target)
        (pw, pl), (rw, rl) = lp.chunk(2), lr.chunk(2)
        z = -0.5 * beta * ((pw - pl) - (rw - rl)).double()
        expect = float(-torch.nn.functional.logsigmoid(z).mean())
        tol = beta_scaled_tolerance(beta, lp, lr)
        assert float(out.loss) == pytest.approx(expect, abs=tol)
        # not the forward-process latents
        direct = build_method({"name": "diffusion-dpo", "beta": beta}, backbone).loss(batch)
        assert abs(float(direct.loss) - float(out.loss)) > 1e-4
        # swapped labels flip the sign of the logit: the loss becomes that of -z
        swapped = build_method({"name": "inpo", "eta": 0.0, "beta": beta}, backbone).loss(swap_groups(batch))
        assert float(swapped.loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(-z).mean()), abs=tol)
        assert abs(float(swapped.loss) - float(out.loss)) > 10 * tol
    finally:
        move_lora(backbone, 0.0)


def test_any_batch_size_equals_pairs_one_at_a_time(backbone):
    move_lora(backbone, 0.05, seed=1)
    try:
        method = build_method({"name": "inpo", "eta": 0.0}, backbone)
        batch = group_batch(backbone, PROMPTS, t=[900, 10, 500])
        whole = float(method.loss(batch).loss)
        singles = []
        for i in range(3):
            one = group_batch(backbone, [[p[i]] for p in PROMPTS], t=[int(batch.timesteps[i])])
            one.latents = batch.latents[[i, 3 + i]]
            singles.append(float(method.loss(one).loss))
        # batch size changes how the kernels sum: equal up to the logits' fp32 rounding (errors are O(1))
        assert whole == pytest.approx(sum(singles) / 3, abs=beta_scaled_tolerance(method.config.beta, torch.ones(1)))
    finally:
        move_lora(backbone, 0.0)


def test_eta_noise_is_a_function_of_the_batch(backbone):
    method = build_method({"name": "inpo", "eta": 0.1}, backbone)
    move_lora(backbone, 0.05, seed=2)
    try:
        a = float(method.loss(group_batch(backbone, PROMPTS, seed=3)).loss)
        b = float(method.loss(group_batch(backbone, PROMPTS, seed=3)).loss)
        assert a == b
    finally:
        move_lora(backbone, 0.0)


def test_config_is_checked():
    with pytest.raises(ValueError, match="invert_with"):
        build_method({"name": "inpo", "invert_with": "ema"}, None)


def test_default_eta_is_the_originals_on_ddim_models_and_zero_on_flow_models(backbone, tiny_folder):
    import math

    from diffalign.models import load_backbone

    assert build_method({"name": "inpo"}, backbone).eta == 0.1  # SD: the original's value
    sd3 = load_backbone(tiny_folder("sd3"))
    sd3.add_lora(rank=4)
    method = build_method({"name": "inpo", "beta": 500.0}, sd3)
    assert method.eta == 0.0
    loss = float(method.loss(group_batch(sd3, PROMPTS, seed=1)).loss)  # trains on SD3 with the defaults
    assert loss == pytest.approx(math.log(2), abs=1e-5)  # LoRA at zero: policy = reference
    with pytest.raises(ValueError, match="use eta=0 for flow models"):  # an explicit eta stays an error
        build_method({"name": "inpo", "eta": 0.1}, sd3).loss(group_batch(sd3, PROMPTS, seed=1))
