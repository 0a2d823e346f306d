"""Qwen-Image as a diffalign backbone, on a tiny random pipeline of the real architecture: the pipeline's prompt
template, per-channel latent normalisation, 2×2 packing, dynamic-shift schedule and norm-rescaled true CFG,
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
from diffalign.models import Conditioning, QwenImageBackbone, detect_family, load_backbone
from diffalign.models.qwen_image import pack_latents, unpack_latents

PROMPTS = ["a photo of a red cat", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffalign import testing

    return testing.make_tiny_qwen_image(tmp_path_factory.mktemp("qwen") / "model")


@pytest.fixture
def qwen(folder):
    return load_backbone(folder)


def test_loads_as_qwen_image_with_the_unshifted_training_flow(folder, qwen):
    assert detect_family(folder) == "qwen-image" and isinstance(qwen, QwenImageBackbone)
    # dynamic shifting: diffusers' script trains on the scheduler's init grid, unshifted
    assert isinstance(qwen.forward_process, FlowMatchingForward) and qwen.forward_process.shift == 1.0
    assert qwen.latent_channels == 4 and qwen.raw_denoiser.config.in_channels == 16  # 2×2 packed


def test_prompt_template_prefix_is_dropped_and_padding_is_masked(qwen):
    pipe = qwen.pipeline
    cond = qwen.encode_prompt(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        ids = pipe.tokenizer(pipe.prompt_template_encode.format(prompt), return_tensors="pt").input_ids
        hidden = pipe.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        n = ids.shape[1] - 34  # the template's 34 prefix tokens are dropped
        assert int(cond.mask[i].sum()) == n and cond.mask[i, :n].all()
        torch.testing.assert_close(cond.prompt_embeds[i, :n], hidden[34:])
        assert not cond.prompt_embeds[i, n:].any()
    assert int(cond.mask[1].sum()) == 5  # "" keeps the template's suffix: <|im_end|> \n <|im_start|> assistant \n


def test_padding_never_changes_a_prediction(qwen):
    """Prompts of different lengths batch together (Conditioning.cat pads): the same predictions as alone."""
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([700.0, 200.0])
    alone = [qwen.encode_prompt([p]) for p in PROMPTS]
    batched = Conditioning.cat(alone)
    assert batched.prompt_embeds.shape[1] == alone[0].prompt_embeds.shape[1] and batched.mask[1].sum() == 5
    together = qwen.predict(x, t, batched)
    for i in range(2):
        torch.testing.assert_close(together[i:i + 1], qwen.predict(x[i:i + 1], t[i:i + 1], alone[i]),
                                   rtol=0, atol=1e-5)


def test_conditioning_cat_pads_to_the_longest_by_hand():
    a = Conditioning(torch.ones(1, 2, 3), mask=torch.tensor([[1, 1]]))
    b = Conditioning(torch.full((2, 3, 3), 2.0), mask=torch.tensor([[1, 1, 0], [1, 1, 1]]))
    c = Conditioning(torch.full((1, 1, 3), 3.0))  # no mask: every token real
    out = Conditioning.cat([a, b, c])
    assert out.prompt_embeds.shape == (4, 3, 3)
    assert out.mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]]
    assert out.prompt_embeds[:, :, 0].tolist() == [[1, 1, 0], [2, 2, 2], [2, 2, 2], [3, 0, 0]]
    assert Conditioning.from_dict(out.to_dict()).mask.tolist() == out.mask.tolist()  # survives the text cache


def test_latents_are_normalised_per_channel_as_the_pipeline_does(qwen):
    vae, cfg = qwen.vae, qwen.vae.config
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = qwen.encode_images(pixels)
    assert latents.shape == (2, 4, 16, 16)
    mean, std = torch.tensor(cfg.latents_mean).view(1, 4, 1, 1), torch.tensor(cfg.latents_std).view(1, 4, 1, 1)
    z = vae.encode(pixels[:, :, None]).latent_dist.mode()[:, :, 0]  # a one-frame clip through the video VAE
    torch.testing.assert_close(latents, (z - mean) / std)
    decoded = vae.decode((latents * std + mean)[:, :, None]).sample[:, :, 0]
    torch.testing.assert_close(qwen.decode_latents(latents), (decoded / 2 + 0.5).clamp(0, 1))
    x = torch.randn(2, 4, 16, 16)
    assert pack_latents(x).shape == (2, 64, 16) and torch.equal(unpack_latents(pack_latents(x), 16, 16), x)


def test_ode_sampling_reproduces_the_pipeline_with_true_cfg(qwen):
    """noise level 0: the pipeline's σ grid (linspace(1, 1/T, T), shifted by μ of the token count, stretched to
    shift_terminal), packing, timestep/1000 and the norm-rescaled true CFG, step for step."""
    pipe = qwen.pipeline
    sampler = make_sampler(qwen, 3, eta=0.0, resolution=32)
    traj = sample_trajectory(qwen, sampler, qwen.encode_prompt(PROMPTS), guidance_scale=4.0,
                             generator=torch.Generator().manual_seed(0), height=32, width=32)
    kw = dict(negative_prompt=[""] * 2, true_cfg_scale=4.0, num_inference_steps=3, height=32, width=32)
    ref = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    torch.testing.assert_close(traj.final, unpack_latents(ref, 16, 16), rtol=0, atol=1e-5)
    torch.testing.assert_close(traj.timesteps, pipe.scheduler.timesteps)
    assert sampler.sigmas[-2] == pytest.approx(0.02)  # Qwen-Image's shift_terminal
    images = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    torch.testing.assert_close(qwen.decode_latents(traj.final), images, rtol=0, atol=1e-4)


def test_diffusion_dpo_lora_starts_at_ln2_and_loads_in_plain_diffusers(folder, tmp_path):
    rows = train_offline(folder, pair_parquet(tmp_path / "pairs.parquet"), tmp_path / "run", "--train.max_steps=2",
                         "--method.beta=500")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the adapter-off reference equals the policy
    assert rows[0]["implicit_acc"] == 0.5 and rows[1]["loss"] != rows[0]["loss"]
    assert_final_loads_in_diffusers(folder, tmp_path / "run" / "final", negative_prompt="", true_cfg_scale=2.0)


def test_an_encoded_set_trains_as_the_raw_one(folder, tmp_path, capsys):
    """Prompts of different lengths cached one by one (`diffalign data encode`) come back padded and masked:
    the run without text encoder sees the same first batch as the run that encodes it."""
    from diffalign.cli import main

    data = pair_parquet(tmp_path / "pairs.parquet")
    raw = train_offline(folder, data, tmp_path / "raw", "--train.max_steps=2")
    common = [f"--model.pretrained={folder}", f"--data.source={data}", "--data.resolution=32",
              f"--data.cache_dir={tmp_path / 'cache'}"]
    assert main(["data", "encode", "-", *common]) == 0
    cached = train_offline(folder, data, tmp_path / "cached", "--train.max_steps=2", *common[2:])
    assert "no text encoder loaded" in capsys.readouterr().out
    for key in ("model_mse_chosen", "model_mse_rejected", "loss"):
        assert cached[0][key] == pytest.approx(raw[0][key], rel=1e-5), key


@pytest.mark.parametrize("method", ["mapo", "kto", "sft"])
def test_other_offline_methods_run_a_step(method, folder, tmp_path):
    assert_offline_method_runs_a_step(folder, tmp_path, method)


def test_flow_grpo_ratio_is_exactly_one_before_the_first_update(folder, tmp_path):
    assert_flow_grpo_ratio_is_one_before_the_first_update(folder, tmp_path)


def test_a_rollout_samples_every_call_at_the_one_text_length_the_update_recomputes_at(folder, tmp_path):
    """Prompts of different token counts in different sampler calls: each call is padded to the rollout's
    longest prompt, the length its micro-batches (drawn across calls) are recomputed at. Sampling a call
    at its own shorter length changed the recomputed log-probs in the last bits under some CPU kernels
    (ATEN_CPU_CAPABILITY=default), so the first ratio was not exactly 1."""
    import json

    from diffalign.trainers.loop import setup
    from diffalign.trainers.registry import load_recipe

    texts = ["a cat", "a cat", "a photo of a red cat on a blue square mat", "a photo of a red cat on a blue square mat"]
    args = [f"model.pretrained={folder}", "model.lora_rank=4", "method.name=flow-grpo",
            f"method.prompts={json.dumps(texts[1:3])}", "method.num_steps=2", "method.resolution=32",
            "method.reward=brightness", f"train.output_dir={tmp_path / 'run'}", "train.batch_size=2",
            "train.checkpointing_steps=0"]
    run = setup(load_recipe(None, args))
    calls = []
    traj = run.method.sample(run, texts, 0, on_call=lambda part, chunk: calls.append(part.cond.prompt_embeds.shape[1]))
    own = [run.backbone.encode_prompt(texts[i:i + 2]).prompt_embeds.shape[1] for i in (0, 2)]
    assert own[0] < own[1]  # the calls' own lengths differ ...
    assert calls == [own[1], own[1]] == [traj.cond.prompt_embeds.shape[1]] * 2  # ... they are sampled at one


def test_the_dpo_recipe_runs_as_written_on_the_tiny_model(folder, tmp_path):
    """Its options are valid for the family (gradient checkpointing on, its LoRA rank and targets)."""
    rows = run_recipe_on_tiny("qwen-image-diffusion-dpo.yaml", folder, tmp_path / "run",
                              f"--data.source={pair_parquet(tmp_path / 'pairs.parquet')}", "--data.resolution=32",
                              "--train.batch_size=2")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_the_flow_grpo_recipe_runs_as_written_on_the_tiny_model(folder, tmp_path):
    rows = run_recipe_on_tiny("qwen-image-flow-grpo.yaml", folder, tmp_path / "run", "--method.reward=brightness",
                              '--method.prompts=["a red cat", "a blue square"]', "--method.prompts_per_epoch=1",
                              "--method.images_per_prompt=2", "--method.num_steps=3", "--method.resolution=32",
                              "--train.batch_size=2")
    assert rows[0]["ratio_max_dev"] == 0.0 and rows[0]["grad_norm"] > 0


def test_the_diffusionnft_recipe_runs_as_written_on_the_tiny_model(folder, tmp_path):
    """CFG-free rollouts and forward-process training on the packed, masked backbone: at the first step the policy,
    the old policy and the base model agree, so the KL and the positive/negative split are zero."""
    rows = run_recipe_on_tiny("qwen-image-diffusionnft.yaml", folder, tmp_path / "run", "--method.reward=brightness",
                              '--method.prompts=["a red cat", "a blue square"]', "--method.prompts_per_epoch=1",
                              "--method.images_per_prompt=2", "--method.num_steps=3", "--method.resolution=32",
                              "--method.sample_batch_size=2", "--train.batch_size=2")
    assert rows[0]["kl"] == 0.0 and rows[0]["loss_positive"] == rows[0]["loss_negative"]
    assert math.isfinite(rows[0]["loss"]) and rows[0]["grad_norm"] > 0


def test_eval_generation_uses_the_pipelines_true_cfg(qwen):
    """`diffalign eval` images: guidance_scale w is Qwen-Image's true_cfg_scale w with the negative prompt ""."""
    import numpy as np

    from diffalign.eval.generate import generate

    pipe = qwen.pipeline
    kw = dict(num_inference_steps=2, height=32, width=32)
    ours = generate(pipe, ["a red cat"], [7], guidance_scale=3.0, **kw)[0]
    ref = pipe(["a red cat"], generator=[torch.Generator().manual_seed(7)], true_cfg_scale=3.0, negative_prompt=[""],
               **kw).images[0]
    plain = generate(pipe, ["a red cat"], [7], guidance_scale=1.0, **kw)[0]
    assert np.array_equal(np.asarray(ours), np.asarray(ref)) and not np.array_equal(np.asarray(ours),
                                                                                    np.asarray(plain))
