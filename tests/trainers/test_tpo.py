import random

import pytest
import torch
from structured_helpers import (
    assert_ln2_at_init_with_gradient,
    beta_scaled_tolerance,
    group_batch,
    lora_grad_norm,
    move_lora,
    tiny_backbone,
)

from diffalign.core.likelihood import denoising_error
from diffalign.trainers import build_method
from diffalign.trainers.method import batch_generator
from diffalign.trainers.tpo import negative_captions

PROMPTS = [["a red hat", "a photo of two dogs", "a landscape"]]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("tpo") / "sd")


def test_negative_captions():
    rng = random.Random(0)
    negs = negative_captions(["a red hat", "a landscape", "", "a landscape"], rng, ["colour"])
    assert negs[0] != "a red hat" and negs[0].endswith(" hat")
    assert negs[1] == "a red hat"  # no rule applies: the next different caption of the batch
    assert negs[2] is None  # a dropped caption has no negative
    assert negative_captions(["a landscape", "a landscape"], rng, ["colour"]) == [None, None]


def test_dpo_form_by_hand(backbone):
    batch = group_batch(backbone, PROMPTS)
    method = build_method({"name": "tpo", "beta": 5000.0}, backbone)
    assert_ln2_at_init_with_gradient(backbone, method.loss(batch))
    move_lora(backbone, 0.05)
    try:
        out = method.loss(batch)
        negs = negative_captions(batch.prompts, random.Random(batch_generator(batch, "tpo").initial_seed()),
                                 method.config.perturb_kinds)
        cneg = backbone.encode_prompt(negs)
        with torch.no_grad():
            def err(cond, ref=False):
                if ref:
                    with backbone.reference():
                        return denoising_error(backbone.predict(batch.x_t, batch.timesteps, cond), batch.target)
                return denoising_error(backbone.predict(batch.x_t, batch.timesteps, cond), batch.target)
            errors = [err(batch.cond), err(cneg), err(batch.cond, True), err(cneg, True)]
        h = (errors[0] - errors[1]) - (errors[2] - errors[3])
        z = -0.5 * 5000.0 * h.double()
        tol = beta_scaled_tolerance(5000.0, *errors)
        assert float(out.loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(z).mean()), abs=tol)
        flipped = build_method({"name": "tpo", "beta": 5000.0, "flip_labels": True}, backbone).loss(batch)
        assert float(flipped.loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(-z).mean()), abs=tol)
        assert abs(float(out.loss) - float(flipped.loss)) > 10 * tol  # the check can tell the two labels apart
    finally:
        move_lora(backbone, 0.0)


def test_kto_form_and_dropped_captions(backbone):
    method = build_method({"name": "tpo", "form": "kto", "perturb_kinds": ["count", "colour"]}, backbone)
    batch = group_batch(backbone, PROMPTS)
    out = method.loss(batch)
    assert float(out.loss) == pytest.approx(0.5, abs=1e-6)  # 1 − σ(0) per row at init
    out.loss.backward()
    assert lora_grad_norm(backbone) > 0
    backbone.raw_denoiser.zero_grad()
    dropped = group_batch(backbone, [["", ""]])
    out = build_method({"name": "tpo"}, backbone).loss(dropped)
    assert float(out.loss) == 0.0  # no negatives: every row weighs 0
    with pytest.raises(ValueError, match="form"):
        build_method({"name": "tpo", "form": "orpo"}, backbone)
    with pytest.raises(ValueError, match="perturbation kind"):
        build_method({"name": "tpo", "perturb_kinds": ["texture"]}, backbone)
