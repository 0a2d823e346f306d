"""Diffusion-KTO on preference pairs: ``paired_noise`` keeps each pair's two images on one noise and
timestep, and then, at initialisation, its gradient is Diffusion-DPO's at a quarter of the β."""

import dataclasses

import pytest
import torch
from structured_helpers import group_batch, tiny_backbone

from diffalign.trainers import build_method
from diffalign.trainers.data import load_training_data
from diffalign.trainers.registry import recipe_from_dict

PROMPTS = [["a red hat", "a blue cat", "a dog"], ["a red cap", "a blue dog", "a cat"]]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("kto") / "sd")


def _grads(backbone, method, batch) -> torch.Tensor:
    backbone.raw_denoiser.zero_grad()
    out = method.loss(batch)
    out.loss.backward()
    g = torch.cat([p.grad.flatten() for n, p in backbone.raw_denoiser.named_parameters() if p.grad is not None])
    backbone.raw_denoiser.zero_grad()
    return g, out


def test_paired_kto_at_init_has_the_dpo_gradient_at_a_quarter_of_beta(backbone):
    # KTO: mean over 2B images of 1 − σ(±β·r), dL/dr = ∓β/4 at r = 0 → −(β/8)·mean over pairs of (∇ℓw − ∇ℓl);
    # DPO: mean over B pairs of −log σ(β'·h) → −(β'/2)·mean of (∇ℓw − ∇ℓl). Equal when β' = β/4.
    pairs = group_batch(backbone, PROMPTS)
    feedback = dataclasses.replace(pairs, weights=torch.ones(6), desirable=torch.tensor([True] * 3 + [False] * 3))
    g_kto, out = _grads(backbone, build_method({"name": "kto", "beta": 2000.0}, backbone), feedback)
    g_dpo, _ = _grads(backbone, build_method({"name": "diffusion-dpo", "beta": 500.0}, backbone), pairs)
    assert float(out.loss.detach()) == pytest.approx(0.5, abs=1e-6)
    assert float(out.metrics["kl_reference_point"]) == 0.0
    assert g_kto.norm() > 0
    torch.testing.assert_close(g_kto, g_dpo, rtol=1e-4, atol=1e-9)


def test_paired_noise_keeps_each_pair_on_one_noise_and_counts_batches_in_pairs(backbone, pair_parquet, tmp_path):
    recipe = recipe_from_dict({"data": {"source": str(pair_parquet), "format": "pickapic", "resolution": 32},
                               "train": {"batch_size": 2, "output_dir": str(tmp_path)}})
    paired = build_method({"name": "kto", "paired_noise": True}, backbone)
    assert paired.data_kind == "feedback-pairs"
    batch = load_training_data(recipe, paired.data_kind, backbone, tmp_path).batch(0, 0, 0, 1)
    assert batch.latents.shape[0] == 4 and batch.weights.shape == (4,)
    assert batch.desirable.tolist() == [True, True, False, False]  # [winners, losers]
    assert torch.equal(batch.noise[:2], batch.noise[2:]) and torch.equal(batch.timesteps[:2], batch.timesteps[2:])
    assert batch.prompts[:2] == batch.prompts[2:]

    single = build_method({"name": "kto"}, backbone)  # the original: images shuffled apart, batch in images
    assert single.data_kind == "feedback"
    data = load_training_data(recipe, single.data_kind, backbone, tmp_path)
    assert len(data) == 2 * 12  # 12 non-tie pairs (the ties left out from the label column), two images each
    assert data.batch(0, 0, 0, 1).latents.shape[0] == 2
