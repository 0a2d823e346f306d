"""Z-Image as a diffalign backbone, on a tiny random pipeline of the real architecture: the chat-template prompt
features, the list-input transformer's reversed time and negated output, the σ schedule and the pipeline's CFG,
reproduced; Diffusion-DPO / MaPO / KTO / SFT / Flow-GRPO runs through the engine; the LoRA loads in diffusers."""

import math

import pytest
import torch
from family_runs import (
    assert_final_loads_in_diffusers,
    assert_flow_grpo_ratio_is_one_before_the_first_update,
    assert_offline_method_runs_a_step,
    pair_parquet,
    run_recipe_on_tiny,
    train_offline,
)

from diffalign.core.forward import FlowMatchingForward
from diffalign.core.sampling import make_sampler, sample_trajectory
from diffalign.models import Conditioning, ZImageBackbone, detect_family, load_backbone

PROMPTS = ("a photo of a red cat", "")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffalign import testing

    return testing.make_tiny_z_image(tmp_path_factory.mktemp("zimage") / "model")


@pytest.fixture
def zimage(folder):
    return load_backbone(folder)


def test_loads_as_z_image_with_the_shifted_training_flow(folder, zimage):
    assert detect_family(folder) == "z-image" and isinstance(zimage, ZImageBackbone)
    assert isinstance(zimage.forward_process, FlowMatchingForward) and zimage.forward_process.shift == 3.0
    assert zimage.latent_channels == 16 and zimage.pipeline.default_sample_size * zimage.pipeline.vae_scale_factor \
        == 1024  # the pipeline's default image side


def test_prompt_features_are_the_pipelines_padded_with_a_mask(zimage):
    cond = zimage.encode_prompt(PROMPTS)
    ref, _ = zimage.pipeline.encode_prompt(list(PROMPTS), do_classifier_free_guidance=False)  # (writes into the list)
    for i, feats in enumerate(ref):  # the penultimate states of the real (chat-templated) tokens
        n = feats.shape[0]
        assert int(cond.mask[i].sum()) == n and cond.mask[i, :n].all()
        torch.testing.assert_close(cond.prompt_embeds[i, :n], feats)
        assert not cond.prompt_embeds[i, n:].any()
    assert ref[0].shape[0] > ref[1].shape[0]


def test_padding_never_changes_a_prediction(zimage):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 16, 16, generator=g), torch.tensor([700.0, 200.0])
    alone = [zimage.encode_prompt([p]) for p in PROMPTS]
    together = zimage.predict(x, t, Conditioning.cat(alone))
    for i in range(2):
        torch.testing.assert_close(together[i:i + 1], zimage.predict(x[i:i + 1], t[i:i + 1], alone[i]),
                                   rtol=0, atol=1e-5)


def test_ode_sampling_reproduces_the_pipeline_with_cfg(zimage):
    """noise level 0: the pipeline's σ grid (linspace(1, 1/T, T), shift 3), the reversed time, the negated
    output and its CFG c + w(c − u), step for step; decoding with shift_factor / scaling_factor."""
    pipe = zimage.pipeline
    sampler = make_sampler(zimage, 3, eta=0.0, resolution=32)
    traj = sample_trajectory(zimage, sampler, zimage.encode_prompt(PROMPTS), guidance_scale=3.0,
                             generator=torch.Generator().manual_seed(0), height=32, width=32)
    kw = dict(guidance_scale=3.0, num_inference_steps=3, height=32, width=32)
    # (a copy each time: the pipeline writes the chat-templated prompts into the list it is given)
    ref = pipe(list(PROMPTS), generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    torch.testing.assert_close(traj.final, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(traj.timesteps, pipe.scheduler.timesteps)
    images = pipe(list(PROMPTS), generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    torch.testing.assert_close(zimage.decode_latents(traj.final), images, rtol=0, atol=1e-4)


def test_predict_is_the_velocity_of_the_core_convention(zimage):
    """At σ = 1 the noisy latent is pure noise ε; one Euler step x − σ·v of the velocity ε − x0 lands on the
    model's x0 estimate, which the forward process gives back: the sign and time of the wrapped model agree."""
    cond = zimage.encode_prompt(PROMPTS[:1])
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([1000.0])
    v = zimage.predict(x, t, cond)
    raw = zimage.raw_denoiser([x[0, :, None]], torch.tensor([0.0]), [cond.prompt_embeds[0]], return_dict=False)[0]
    torch.testing.assert_close(v, -raw[0][None, :, 0])  # the model is fed time 1 − σ = 0 and predicts −v
    torch.testing.assert_close(zimage.forward_process.x0_from_prediction(x, v, t), x - v)


def test_diffusion_dpo_lora_starts_at_ln2_and_loads_in_plain_diffusers(folder, tmp_path):
    rows = train_offline(folder, pair_parquet(tmp_path / "pairs.parquet"), tmp_path / "run", "--train.max_steps=2",
                         "--method.beta=500")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the adapter-off reference equals the policy
    assert rows[0]["implicit_acc"] == 0.5 and rows[1]["loss"] != rows[0]["loss"]
    assert_final_loads_in_diffusers(folder, tmp_path / "run" / "final", guidance_scale=3.0)


@pytest.mark.parametrize("method", ["mapo", "kto", "sft"])
def test_other_offline_methods_run_a_step(method, folder, tmp_path):
    assert_offline_method_runs_a_step(folder, tmp_path, method)


def test_flow_grpo_ratio_is_exactly_one_before_the_first_update(folder, tmp_path):
    assert_flow_grpo_ratio_is_one_before_the_first_update(folder, tmp_path)


def test_the_dpo_recipe_runs_as_written_on_the_tiny_model(folder, tmp_path):
    """Its options are valid for the family (gradient checkpointing on, its LoRA rank and targets)."""
    rows = run_recipe_on_tiny("z-image-diffusion-dpo.yaml", folder, tmp_path / "run",
                              f"--data.source={pair_parquet(tmp_path / 'pairs.parquet')}", "--data.resolution=32",
                              "--train.batch_size=2")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
