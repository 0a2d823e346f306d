"""FLUX.1 as a diffalign backbone, on tiny random pipelines of the real architecture (dev: guidance embedding;
schnell: none): the pipeline's prompt encoding, 2×2 packing with latent image ids, the guidance embedding as an
input, the unshifted uniform training flow and the dynamic-shift sampling schedule, reproduced; Diffusion-DPO /
MaPO / KTO / SFT / Flow-GRPO runs through the engine; the LoRA loads in diffusers."""

import math

import numpy as np
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
from diffalign.core.sampling import make_sampler, sample_trajectory, uses_cfg
from diffalign.models import FluxBackbone, detect_family, load_backbone
from diffalign.models.flux import FLUX_LORA_TARGETS, latent_image_ids
from diffalign.models.qwen_image import pack_latents, unpack_latents

PROMPTS = ["a photo of a red cat", ""]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffalign import testing

    return testing.make_tiny_flux(tmp_path_factory.mktemp("flux") / "model")


@pytest.fixture(scope="module")
def schnell_folder(tmp_path_factory):
    from diffalign import testing

    return testing.make_tiny_flux(tmp_path_factory.mktemp("schnell") / "model", guidance_embeds=False)


@pytest.fixture
def flux(folder):
    return load_backbone(folder)


def test_loads_as_flux_with_the_unshifted_uniform_training_flow(folder, flux):
    assert detect_family(folder) == "flux" and isinstance(flux, FluxBackbone)
    # shift 3.0 in the config, but dynamic shifting: the scheduler's init grid (what diffusers' script trains on)
    # is unshifted, and the script's weighting_scheme "none" draws σ uniformly
    assert flux.scheduler.config.shift == 3.0 and flux.scheduler.config.use_dynamic_shifting
    torch.testing.assert_close(flux.scheduler.sigmas, torch.linspace(1, 1 / 1000, 1000))  # the init grid
    fp = flux.forward_process
    assert isinstance(fp, FlowMatchingForward) and fp.shift == 1.0 and fp.timestep_sampling == "uniform"
    torch.testing.assert_close(fp.sample_timesteps(5, generator=torch.Generator().manual_seed(0)),
                               torch.rand(5, generator=torch.Generator().manual_seed(0)) * 1000)
    assert flux.latent_channels == 16 and flux.raw_denoiser.config.in_channels == 64  # 2×2 packed
    assert flux.embeds_guidance and flux.guidance_scale == 3.5


def test_flux2_is_not_taken_for_flux(tmp_path):
    import json

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Flux2Pipeline"}))
    with pytest.raises(ValueError, match="unsupported pipeline 'Flux2Pipeline'"):
        detect_family(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxImg2ImgPipeline"}))
    assert detect_family(tmp_path) == "flux"


def test_prompt_encoding_is_the_pipelines(flux):
    pipe = flux.pipeline
    cond = flux.encode_prompt(PROMPTS)
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=512)
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=0, atol=0)
    torch.testing.assert_close(cond.pooled, pooled, rtol=0, atol=0)
    assert cond.prompt_embeds.shape == (2, 512, 32) and not text_ids.any()
    # by hand: CLIP's pooled output and T5's last hidden states over the 512 padded tokens
    ids = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                         return_tensors="pt").input_ids
    torch.testing.assert_close(cond.pooled, pipe.text_encoder(ids).pooler_output)
    ids_2 = pipe.tokenizer_2(PROMPTS, padding="max_length", max_length=512, truncation=True,
                             return_tensors="pt").input_ids
    torch.testing.assert_close(cond.prompt_embeds, pipe.text_encoder_2(ids_2)[0])
    assert not torch.allclose(cond.prompt_embeds[0], cond.prompt_embeds[1])


def test_packing_and_image_ids_are_the_pipelines(flux):
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 16, 12)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 48, 64) and torch.equal(unpack_latents(tokens, 16, 12), x)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 2, 16, 16, 12))
    # the pipeline's unpack takes the image size: latents 16×12 are a 32×24 image with the tiny VAE's factor 2
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 32, 24, flux.pipeline.vae_scale_factor), x)
    ids = latent_image_ids(16, 12)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 8, 6, "cpu", torch.float32))
    assert ids[7].tolist() == [0, 1, 1]  # token 7 = row 1, col 1 of the 8×6 patch grid


def test_latents_are_shifted_and_scaled_as_the_pipeline_does(flux):
    cfg = flux.vae.config
    assert (cfg.shift_factor, cfg.scaling_factor, cfg.latent_channels) == (0.1159, 0.3611, 16)
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = flux.encode_images(pixels)
    torch.testing.assert_close(latents, (flux.vae.encode(pixels).latent_dist.mode() - 0.1159) * 0.3611)
    decoded = flux.vae.decode(latents / 0.3611 + 0.1159).sample
    torch.testing.assert_close(flux.decode_latents(latents), (decoded / 2 + 0.5).clamp(0, 1))


def test_predict_calls_the_transformer_as_the_pipeline_does(flux):
    """One step by hand: packed latents, image ids, zero txt_ids, timestep/1000, the pooled CLIP embedding and the
    guidance input (3.5 unless given), unpacked."""
    pipe = flux.pipeline
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 16, 16, 16, generator=g), torch.tensor([700.0, 200.0])
    cond = flux.encode_prompt(PROMPTS)
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None)

    def by_hand(guidance):
        out = pipe.transformer(hidden_states=pipe._pack_latents(x, 2, 16, 16, 16), timestep=t / 1000,
                               guidance=torch.full([2], guidance), pooled_projections=pooled,
                               encoder_hidden_states=embeds, txt_ids=text_ids,
                               img_ids=pipe._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32),
                               return_dict=False)[0]
        return pipe._unpack_latents(out, 32, 32, pipe.vae_scale_factor)

    torch.testing.assert_close(flux.predict(x, t, cond), by_hand(3.5), rtol=0, atol=0)
    torch.testing.assert_close(flux.predict(x, t, cond, guidance=1.0), by_hand(1.0), rtol=0, atol=0)
    assert not torch.allclose(by_hand(1.0), by_hand(3.5))  # the embedding is an input that matters
    # a sampler's guidance_scale goes to the embedding: no classifier-free guidance on a distilled model
    assert not uses_cfg(3.5, flux) and uses_cfg(3.5)


def test_sampling_schedule_is_the_pipelines(flux):
    """σ = linspace(1, 1/T, T) and μ linear in the token count (FLUX's 256 / 4096 / 0.5 / 1.15)."""
    m = (1.15 - 0.5) / (4096 - 256)
    schedule = flux.flow_schedule(4, 32, 32)
    assert schedule["sigmas"] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert schedule["mu"] == pytest.approx(0.5 + m * (64 - 256))  # 32² → 16² latents → 64 tokens
    # 4096 tokens (the real model's 1024², with its VAE factor 8; 256² with the tiny one's 2) → μ = max_shift
    assert flux.flow_schedule(4, 256, 256)["mu"] == pytest.approx(1.15)


def test_ode_sampling_reproduces_the_pipeline_with_embedded_guidance(flux):
    """noise level 0: the pipeline's σ grid (dynamic-shifted by μ), packing, ids, timestep/1000 and guidance 3.5 as
    the embedding's input (one transformer pass per step), step for step."""
    pipe = flux.pipeline
    sampler = make_sampler(flux, 3, eta=0.0, resolution=32)
    traj = sample_trajectory(flux, sampler, flux.encode_prompt(PROMPTS), guidance_scale=3.5,
                             generator=torch.Generator().manual_seed(0), height=32, width=32)
    assert traj.uncond is None  # no negative prompt encoded: no CFG
    kw = dict(guidance_scale=3.5, num_inference_steps=3, height=32, width=32)
    ref = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="latent", **kw).images
    torch.testing.assert_close(traj.final, unpack_latents(ref, 16, 16), rtol=0, atol=1e-5)
    torch.testing.assert_close(traj.timesteps, pipe.scheduler.timesteps)
    images = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).images
    torch.testing.assert_close(flux.decode_latents(traj.final), images, rtol=0, atol=1e-4)
    other = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="latent",
                 **{**kw, "guidance_scale": 1.0}).images
    assert not torch.allclose(other, ref, atol=1e-4)


def test_schnell_without_guidance_embedding_runs_true_cfg(schnell_folder):
    """FLUX.1-schnell's transformer has no guidance embedding: guidance_scale > 1 is the pipeline's true CFG
    (true_cfg_scale with the negative prompt "")."""
    schnell = load_backbone(schnell_folder)
    pipe = schnell.pipeline
    assert not schnell.embeds_guidance and uses_cfg(2.0, schnell)
    sampler = make_sampler(schnell, 2, eta=0.0, resolution=32)
    traj = sample_trajectory(schnell, sampler, schnell.encode_prompt(PROMPTS), guidance_scale=2.0,
                             generator=torch.Generator().manual_seed(0), height=32, width=32)
    ref = pipe(PROMPTS, negative_prompt=[""] * 2, true_cfg_scale=2.0, num_inference_steps=2, height=32, width=32,
               generator=torch.Generator().manual_seed(0), output_type="latent").images
    torch.testing.assert_close(traj.final, unpack_latents(ref, 16, 16), rtol=0, atol=1e-5)


def test_lora_goes_on_the_scripts_modules(flux):
    flux.add_lora(rank=4)
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in flux.raw_denoiser.named_parameters() if ".lora_A" in name}
    double = "transformer_blocks.0."
    assert {double + m for m in ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj",
                                 "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                                 "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]} <= adapted
    single = {n for n in adapted if n.startswith("single_transformer_blocks.")}
    assert single == {f"single_transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v")}
    assert len(FLUX_LORA_TARGETS) == 12


def test_diffusion_dpo_lora_starts_at_ln2_and_loads_in_plain_diffusers(folder, tmp_path):
    rows = train_offline(folder, pair_parquet(tmp_path / "pairs.parquet"), tmp_path / "run", "--train.max_steps=2",
                         "--method.beta=500")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # the adapter-off reference equals the policy
    assert rows[0]["implicit_acc"] == 0.5 and rows[1]["loss"] != rows[0]["loss"]
    assert_final_loads_in_diffusers(folder, tmp_path / "run" / "final", guidance_scale=3.5)


def test_an_encoded_set_trains_as_the_raw_one(folder, tmp_path, capsys):
    """T5 sequences and CLIP pooled embeddings cached by `diffalign data encode` come back as encoded: the run
    without text encoders sees the same first batch as the run that encodes it."""
    from diffalign.cli import main

    data = pair_parquet(tmp_path / "pairs.parquet")
    raw = train_offline(folder, data, tmp_path / "raw", "--train.max_steps=1")
    common = [f"--model.pretrained={folder}", f"--data.source={data}", "--data.resolution=32",
              f"--data.cache_dir={tmp_path / 'cache'}"]
    assert main(["data", "encode", "-", *common]) == 0
    cached = train_offline(folder, data, tmp_path / "cached", "--train.max_steps=1", *common[2:])
    assert "no text encoder loaded" in capsys.readouterr().out
    for key in ("model_mse_chosen", "model_mse_rejected", "loss"):
        assert cached[0][key] == pytest.approx(raw[0][key], rel=1e-5), key


def test_offline_training_feeds_the_recipes_embedded_guidance(folder, schnell_folder, tmp_path, capsys):
    """model.embedded_guidance is the guidance input of every DPO forward (default 3.5, diffusers' script); the
    family is accepted by name; a model without a guidance embedding refuses the option."""
    from diffalign.cli import main

    data = pair_parquet(tmp_path / "pairs.parquet")
    default = train_offline(folder, data, tmp_path / "default", "--train.max_steps=1", "--model.family=flux")
    explicit = train_offline(folder, data, tmp_path / "explicit", "--train.max_steps=1",
                             "--model.embedded_guidance=3.5")
    one = train_offline(folder, data, tmp_path / "one", "--train.max_steps=1", "--model.embedded_guidance=1.0")
    assert explicit[0]["model_mse_chosen"] == default[0]["model_mse_chosen"]
    assert one[0]["model_mse_chosen"] != default[0]["model_mse_chosen"]
    args = ["train", "-", f"--model.pretrained={schnell_folder}", f"--data.source={data}", "--data.resolution=32",
            f"--train.output_dir={tmp_path / 'schnell'}", "--train.max_steps=1", "--model.embedded_guidance=1.0"]
    assert main(args) != 0
    assert "has no guidance embedding" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["mapo", "kto", "sft"])
def test_other_offline_methods_run_a_step(method, folder, tmp_path):
    assert_offline_method_runs_a_step(folder, tmp_path, method)


def test_flow_grpo_ratio_is_exactly_one_before_the_first_update(folder, tmp_path):
    assert_flow_grpo_ratio_is_one_before_the_first_update(folder, tmp_path)


def test_the_dpo_recipe_runs_as_written_on_the_tiny_model(folder, tmp_path):
    """Its options are valid for the family (gradient checkpointing on, its LoRA rank and the family's targets)."""
    rows = run_recipe_on_tiny("flux-diffusion-dpo.yaml", folder, tmp_path / "run",
                              f"--data.source={pair_parquet(tmp_path / 'pairs.parquet')}", "--data.resolution=32",
                              "--train.batch_size=2")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_the_flow_grpo_recipe_runs_as_written_on_the_tiny_model(folder, tmp_path):
    """Guidance 3.5 on the embedding: rollout and training make the same single pass, so the ratio is exactly 1."""
    rows = run_recipe_on_tiny("flux-flow-grpo.yaml", folder, tmp_path / "run", "--method.reward=brightness",
                              '--method.prompts=["a red cat", "a blue square"]', "--method.prompts_per_epoch=1",
                              "--method.images_per_prompt=2", "--method.num_steps=3", "--method.resolution=32",
                              "--train.batch_size=2")
    assert rows[0]["ratio_max_dev"] == 0.0 and rows[0]["grad_norm"] > 0


def test_forward_process_methods_train_at_the_rollouts_guidance_embedding(folder, tmp_path):
    """DiffusionNFT's training velocities on FLUX.1-dev take the rollout's guidance_scale as the embedding's input
    (not the backbone's default 3.5), and at the first step the policy, the old copy and the base model agree."""
    import json

    from diffalign.trainers.loop import setup
    from diffalign.trainers.online import epoch_plans, run_rollout
    from diffalign.trainers.registry import load_recipe

    args = [f"model.pretrained={folder}", "model.lora_rank=4", "method.name=diffusion-nft",
            f"method.prompts={json.dumps(['a red cat', 'a blue square'])}", "method.num_steps=3",
            "method.resolution=32", "method.reward=brightness", "method.prompts_per_epoch=2",
            "method.images_per_prompt=2", "method.guidance_scale=1.5", f"train.output_dir={tmp_path / 'run'}",
            "train.batch_size=2", "train.checkpointing_steps=0"]
    run = setup(load_recipe(None, args))
    rollout = run_rollout(run)
    micro = epoch_plans(run, rollout)[0][0][0]
    batch = run.method.noised(run, rollout, micro, tag="nft-noise")
    bb = run.backbone
    with torch.no_grad():
        used = run.method.velocity(batch)
        x = batch.x_t.to(bb.dtype)
        torch.testing.assert_close(used, bb.predict(x, batch.timesteps, batch.cond, guidance=1.5), rtol=0, atol=0)
        assert not torch.allclose(used, bb.predict(x, batch.timesteps, batch.cond), atol=1e-5)
    out = run.method.loss(rollout, micro)
    assert float(out.metrics["kl"]) == 0.0 and float(out.metrics["old_velocity_gap"]) == 0.0


def test_eval_generation_feeds_guidance_scale_to_the_embedding(flux, schnell_folder):
    """`diffalign eval` images: on FLUX.1-dev guidance_scale is the pipeline's (embedded) guidance_scale; on
    schnell it is true_cfg_scale with the negative prompt ""."""
    from diffalign.eval.generate import generate

    kw = dict(num_inference_steps=2, height=32, width=32)
    pipe = flux.pipeline
    ours = generate(pipe, ["a red cat"], [7], guidance_scale=2.0, **kw)[0]
    ref = pipe(["a red cat"], generator=[torch.Generator().manual_seed(7)], guidance_scale=2.0, **kw).images[0]
    assert np.array_equal(np.asarray(ours), np.asarray(ref))
    schnell = load_backbone(schnell_folder).pipeline
    ours = generate(schnell, ["a red cat"], [7], guidance_scale=3.0, **kw)[0]
    ref = schnell(["a red cat"], generator=[torch.Generator().manual_seed(7)], true_cfg_scale=3.0,
                  negative_prompt=[""], **kw).images[0]
    plain = generate(schnell, ["a red cat"], [7], guidance_scale=1.0, **kw)[0]
    assert np.array_equal(np.asarray(ours), np.asarray(ref)) and not np.array_equal(np.asarray(ours),
                                                                                    np.asarray(plain))


def test_validation_images_take_the_pipelines_guidance_arguments(schnell_folder, tmp_path):
    """Training's validation grid passes the weight as `diffalign eval` does: on FLUX.1-schnell (no guidance
    embedding) validation_guidance_scale is true_cfg_scale with the negative prompt ""."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from PIL import Image

    from diffalign.trainers.config import TrainConfig
    from diffalign.trainers.loop import log_validation

    schnell = load_backbone(schnell_folder)
    train = TrainConfig(validation_prompts=["a red cat"], validation_num_inference_steps=2,
                        validation_guidance_scale=3.0, seed=0)
    run = SimpleNamespace(accelerator=Accelerator(cpu=True), backbone=schnell, recipe=SimpleNamespace(train=train),
                          output_dir=tmp_path, global_step=0)
    grid = Image.open(log_validation(run))
    pipe = schnell.pipeline  # at its default size (256² with the tiny VAE), as validation samples
    ref = pipe(["a red cat"], generator=torch.Generator().manual_seed(0), true_cfg_scale=3.0, negative_prompt=[""],
               num_inference_steps=2).images[0]
    assert grid.size == (ref.width + 4, ref.height + 4)  # one image, 2 px of padding around it
    assert np.array_equal(np.asarray(grid.crop((2, 2, 2 + ref.width, 2 + ref.height))), np.asarray(ref))
    plain = pipe(["a red cat"], generator=torch.Generator().manual_seed(0), num_inference_steps=2).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(ref))
