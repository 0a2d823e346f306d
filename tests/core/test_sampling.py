"""Samplers with per-step log-probs: pipeline reproduction, log-prob maths, rescoring (ratio == 1)."""

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from diffalign.core.sampling import (
    DDIMSampler,
    FlowSDESampler,
    Trajectory,
    gaussian_kl,
    make_sampler,
    sample_trajectory,
    sampler_from_config,
    transition_log_probs,
)

PROMPTS = ["a photo of a red cat", "a dog", "blue square and the hat", ""]



@pytest.fixture
def folder(tiny_folder):
    """``folder(name)`` -> a tiny pipeline folder (tests/tiny_pipelines.py), built once per session."""
    return tiny_folder


@pytest.fixture
def load(folder):
    """``load(name)`` -> a fresh backbone (LoRA mutates it)."""
    from diffalign.models import load_backbone

    return lambda name: load_backbone(folder(name))


def with_trained_lora(backbone, seed=1, scale=0.1):
    """Attach a LoRA and make it non-zero, so the policy differs from the reference."""
    backbone.add_lora(rank=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.raw_denoiser.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return backbone


# ------------------------------------------------------------------ eta = 0 reproduces the pipelines
# On a CPU in fp32 the match is bit for bit; the tolerances below allow float32 round-off only.
LATENT_TOL = {"rtol": 0, "atol": 1e-6}
IMAGE_TOL = {"rtol": 0, "atol": 1e-5}


def _pipeline_and_ours(backbone, sampler, steps, guidance, seed=0, **pipe_kwargs):
    pipe = backbone.pipeline
    ref_latents = pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                       guidance_scale=guidance, output_type="latent", **pipe_kwargs).images
    ref_images = pipe(PROMPTS[:2], generator=torch.Generator().manual_seed(seed), num_inference_steps=steps,
                      guidance_scale=guidance, output_type="pt", **pipe_kwargs).images
    traj = sample_trajectory(backbone, sampler, backbone.encode_prompt(PROMPTS[:2]), guidance_scale=guidance,
                             generator=torch.Generator().manual_seed(seed))
    return ref_latents, ref_images, traj


@pytest.mark.parametrize("variant", ["sd", "sd-v"])
def test_ddim_eta0_reproduces_sd_pipeline(load, variant):
    backbone = load(variant)
    assert isinstance(backbone.scheduler, DDIMScheduler)
    sampler = make_sampler(backbone, num_steps=4, eta=0.0)
    ref_latents, ref_images, traj = _pipeline_and_ours(backbone, sampler, 4, 5.0)
    torch.testing.assert_close(traj.final, ref_latents, **LATENT_TOL)
    torch.testing.assert_close(backbone.decode_latents(traj.final), ref_images, **IMAGE_TOL)
    assert traj.latents.shape == (2, 5, 4, 16, 16) and traj.log_probs.shape == (2, 4)
    assert torch.equal(traj.timesteps, backbone.scheduler.timesteps.cpu())
    # deterministic steps: no noise, the sample is the mean, the log-prob is reported as 0
    assert (sampler.stds == 0).all() and (traj.log_probs == 0).all()


def test_ddim_eta1_follows_the_pipelines_noise_order(load):
    """With eta = 1 the step noise is drawn from the same generator in the same order as diffusers."""
    backbone = load("sd")
    ref_latents, _, traj = _pipeline_and_ours(backbone, make_sampler(backbone, 3, eta=1.0), 3, 4.0, eta=1.0)
    torch.testing.assert_close(traj.final, ref_latents, **LATENT_TOL)
    assert (make_sampler(backbone, 3, eta=1.0).stds > 0).all() and torch.isfinite(traj.log_probs).all()


def test_flow_sde_noise0_reproduces_sd3_pipeline(load):
    backbone = load("sd3")
    assert isinstance(backbone.scheduler, FlowMatchEulerDiscreteScheduler)
    sampler = make_sampler(backbone, num_steps=4, eta=0.0)
    assert isinstance(sampler, FlowSDESampler)
    ref_latents, ref_images, traj = _pipeline_and_ours(backbone, sampler, 4, 5.0)
    torch.testing.assert_close(traj.final, ref_latents, **LATENT_TOL)
    torch.testing.assert_close(backbone.decode_latents(traj.final), ref_images, **IMAGE_TOL)
    backbone.scheduler.set_timesteps(4)
    torch.testing.assert_close(traj.timesteps, backbone.scheduler.timesteps.cpu())
    assert (traj.log_probs == 0).all()


def test_sdxl_with_ddim_uses_the_pipelines_zero_negative(load):
    backbone = load("sdxl")
    backbone.pipeline.scheduler = DDIMScheduler.from_config(backbone.scheduler.config)
    neg = backbone.negative_conditioning(2)
    assert not neg.prompt_embeds.any() and not neg.pooled.any()  # force_zeros_for_empty_prompt
    ref_latents, _, traj = _pipeline_and_ours(backbone, make_sampler(backbone.pipeline.scheduler, 3, eta=0.0),
                                              3, 5.0)
    torch.testing.assert_close(traj.final, ref_latents, **LATENT_TOL)


def test_cfg_is_one_batched_call_per_step(load):
    backbone = load("sd")
    batches = []
    handle = backbone.raw_denoiser.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    try:
        sample_trajectory(backbone, make_sampler(backbone, 3), backbone.encode_prompt(PROMPTS[:3]),
                          guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
        assert batches == [6, 6, 6]
        batches.clear()
        sample_trajectory(backbone, make_sampler(backbone, 3), backbone.encode_prompt(PROMPTS[:3]),
                          guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
        assert batches == [3, 3, 3]  # no CFG at guidance 1, as in the pipelines
    finally:
        handle.remove()


# ------------------------------------------------------------------ log-prob maths by hand
def _sd_schedule(prediction_type="epsilon"):
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def _normal_log_prob(x, mean, std):
    return torch.distributions.Normal(mean, std).log_prob(x)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("step", [3, 9])
def test_ddim_log_prob_matches_hand_computation(prediction_type, step):
    eta, T = 0.8, 10
    config = _sd_schedule(prediction_type).config
    sampler = DDIMSampler(config, num_steps=T, eta=eta)
    assert sampler.prediction_type == prediction_type
    # by hand, in float64: "leading" spacing with offset 1 gives t = 100·(T−1−i) + 1, t' = t − 100
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    t = 100 * (T - 1 - step) + 1
    assert int(sampler.timesteps[step]) == t
    a_t = abar[t]
    a_p = abar[t - 100] if t - 100 >= 0 else abar[0]  # set_alpha_to_one=False: ᾱ_0 past the end
    g = torch.Generator().manual_seed(step)
    x, out, x_prev = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    if prediction_type == "epsilon":
        eps = out
    else:
        eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
    x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
    sigma = eta * ((1 - a_p) / (1 - a_t) * (1 - a_t / a_p)).sqrt()
    mean = a_p.sqrt() * x0 + (1 - a_p - sigma**2).sqrt() * eps
    expected = _normal_log_prob(x_prev, mean, sigma).flatten(1)

    res = sampler.step(out.float(), step, x.float(), prev_sample=x_prev.float())
    torch.testing.assert_close(res.mean.double(), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.pred_x0.double(), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(res.std.flatten().double(), sigma.expand(2), rtol=1e-5, atol=0)
    torch.testing.assert_close(res.log_prob.double(), expected.mean(1), rtol=1e-4, atol=1e-4)
    sum_sampler = DDIMSampler(config, num_steps=T, eta=eta, reduction="sum")
    summed = sum_sampler.step(out.float(), step, x.float(), prev_sample=x_prev.float()).log_prob
    torch.testing.assert_close(summed.double(), expected.sum(1), rtol=1e-4, atol=1e-2)


def test_flow_sde_log_prob_matches_hand_computation_and_euler_at_zero():
    T, a, shift = 6, 0.7, 3.0
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sampler = FlowSDESampler(dict(sched.config), num_steps=T, noise_level=a)
    # diffusers: linspace from σ_max to σ_min of the shifted training sigmas (σ_min = shift(1/1000)), then shift
    shifted = lambda s: shift * s / (1 + (shift - 1) * s)
    s = torch.linspace(1.0, shifted(1 / 1000), T, dtype=torch.float64)
    sig = torch.cat([shifted(s), torch.zeros(1, dtype=torch.float64)])
    torch.testing.assert_close(sampler.sigmas.double(), sig, rtol=1e-6, atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x, v, x_next = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    for i in (0, 2, T - 1):
        dt = sig[i + 1] - sig[i]
        gi = a * (sig[i] / (1 - (sig[1] if sig[i] == 1 else sig[i]))).sqrt()  # σ = 1 uses σ_1 (Flow-GRPO)
        eps_hat = x + (1 - sig[i]) * v
        mean = x + (v + gi**2 / (2 * sig[i]) * eps_hat) * dt  # drift − ½ g² ∇log p
        std = gi * (-dt).sqrt()
        res = sampler.step(v.float(), i, x.float(), prev_sample=x_next.float())
        torch.testing.assert_close(res.mean.double(), mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(res.std.flatten().double(), std.expand(2), rtol=1e-5, atol=0)
        torch.testing.assert_close(res.log_prob.double(), _normal_log_prob(x_next, mean, std).flatten(1).mean(1),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res.pred_x0.double(), x - sig[i] * v, rtol=1e-5, atol=1e-5)
    # noise level 0: exactly the scheduler's Euler step x + (σ' − σ) v
    ode = FlowSDESampler(dict(sched.config), num_steps=T, noise_level=0.0)
    sched.set_timesteps(T)
    for i in range(T):
        expected = sched.step(v.float(), sched.timesteps[i], x.float()).prev_sample
        assert torch.equal(ode.step(v.float(), i, x.float()).prev_sample, expected)


def test_gaussian_kl_is_the_equal_variance_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    mean, ref = torch.randn(3, 2, 4, 5, 5, generator=g), torch.randn(3, 2, 4, 5, 5, generator=g)
    std = torch.tensor([[0.5, 0.0]]).expand(3, 2)
    kl = gaussian_kl(mean, ref, std)
    assert kl.shape == (3, 2) and (kl[:, 1] == 0).all()
    p = torch.distributions.Normal(mean[:, 0].double(), 0.5)
    q = torch.distributions.Normal(ref[:, 0].double(), 0.5)
    torch.testing.assert_close(kl[:, 0].double(), torch.distributions.kl_divergence(p, q).flatten(1).mean(1))
    torch.testing.assert_close(gaussian_kl(mean, ref, std, "sum"), kl * 100)
    assert (gaussian_kl(mean, mean, std) == 0).all()


# ------------------------------------------------------------------ rescoring: ratio exactly 1
@pytest.mark.parametrize("variant", ["sd", "sd-v", "sd3"])
def test_recomputed_log_probs_equal_stored_before_any_update(load, variant):
    backbone = with_trained_lora(load(variant))
    sampler = make_sampler(backbone, num_steps=3)  # eta 1 (DDIM) / noise level 0.7 (flow)
    traj = sample_trajectory(backbone, sampler, backbone.encode_prompt(PROMPTS), guidance_scale=4.0,
                             generator=torch.Generator().manual_seed(0))
    assert traj.log_probs.shape == (4, 3) and (sampler.stds > 0).all()

    # same batch (size and rows) as the rollout: bit-identical, so the PPO ratio is exactly 1
    policy = transition_log_probs(backbone, traj)
    assert torch.equal(policy.log_prob, traj.log_probs)
    assert (torch.exp(policy.log_prob - traj.log_probs) == 1).all()
    assert policy.mean.shape == (4, 3, 4, 16, 16) and policy.std.shape == (4, 3)
    # one step at a time (a PPO inner loop), and DDPO's per-sample shuffled steps at the same batch size
    for j in range(3):
        assert torch.equal(transition_log_probs(backbone, traj, j).log_prob[:, 0], traj.log_probs[:, j])
    perm = torch.stack([torch.randperm(3, generator=torch.Generator().manual_seed(k)) for k in range(4)])
    shuffled = transition_log_probs(backbone, traj, perm)
    assert torch.equal(shuffled.log_prob, traj.log_probs.gather(1, perm))
    # a smaller train batch than the rollout's may change kernel blocking: float32 round-off only
    half = transition_log_probs(backbone, traj[1:3], slice(1, 3))
    torch.testing.assert_close(half.log_prob, traj.log_probs[1:3, 1:3], rtol=1e-5, atol=1e-5)

    # the reference (LoRA off) scores the same transitions differently; KL > 0
    with torch.no_grad(), backbone.reference():
        ref = transition_log_probs(backbone, traj)
    assert not torch.allclose(ref.log_prob, traj.log_probs, atol=1e-4)
    assert (gaussian_kl(policy.mean, ref.mean, policy.std) > 0).all()
    # and gradients reach the LoRA through the policy's log-prob
    policy.log_prob[:, 0].sum().backward()
    grads = [p.grad for p in backbone.trainable_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_stored_log_probs_are_those_of_the_sampled_noise(load):
    """log p of each stored transition equals the Gaussian density of the noise that made it."""
    backbone = load("sd")
    sampler = make_sampler(backbone, num_steps=3, eta=1.0)
    traj = sample_trajectory(backbone, sampler, backbone.encode_prompt(PROMPTS[:2]), guidance_scale=1.0,
                             generator=torch.Generator().manual_seed(3))
    scored = transition_log_probs(backbone, traj)
    z = (traj.latents[:, 1:] - scored.mean) / sampler.stds.reshape(1, 3, 1, 1, 1)
    expected = (-0.5 * z.double() ** 2 - torch.log(sampler.stds.double()).reshape(1, 3, 1, 1, 1)
                - 0.5 * math.log(2 * math.pi)).flatten(2).mean(2)
    torch.testing.assert_close(traj.log_probs.double(), expected, rtol=1e-5, atol=1e-5)
    assert abs(z.std().item() - 1) < 0.1 and abs(z.mean().item()) < 0.1


def test_shared_initial_noise_and_trajectory_batching(load):
    backbone = load("sd3")
    sampler = make_sampler(backbone, num_steps=2)
    cond = backbone.encode_prompt(PROMPTS[:2])
    x_T = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    traj = sample_trajectory(backbone, sampler, cond[:1].repeat(2), latents=x_T,
                             guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(traj.latents[0, 0], traj.latents[1, 0])       # D3PO: a pair from one x_T
    assert not torch.equal(traj.final[0], traj.final[1])              # different step noise
    both = Trajectory.cat([traj[1], traj[0]])
    assert torch.equal(both.latents, traj.latents.flip(0)) and torch.equal(both.log_probs, traj.log_probs.flip(0))
    assert len(both) == 2 and both.uncond is not None and both.eta == 0.7
    parked = both.to("cpu")
    assert torch.equal(transition_log_probs(backbone, parked).log_prob, both.log_probs)


def test_sampler_config_round_trips_through_json(load):
    for name in ("sd", "sd3"):
        sampler = make_sampler(load(name), num_steps=5, eta=0.5, reduction="sum")
        again = sampler_from_config(json.loads(json.dumps(sampler.config)))
        assert type(again) is type(sampler) and again.reduction == "sum" and again.eta == 0.5
        assert torch.equal(again.timesteps, sampler.timesteps) and torch.equal(again.stds, sampler.stds)
    with pytest.raises(ValueError, match="reduction"):
        make_sampler(load("sd"), num_steps=5, reduction="max")


def test_bench_sampling_mode_reports_trajectories_per_second(folder, capsys, tmp_path):
    from diffalign.cli import main

    out_json = tmp_path / "bench.json"
    assert main(["bench", "-", "--sampling", f"--model.pretrained={folder('sd')}", "--data.resolution=32",
                 "--num-steps", "2", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                 "--json", str(out_json)]) == 0
    assert "trajectories/s" in capsys.readouterr().out
    result = json.loads(out_json.read_text())
    assert result["trajectories_per_s"] > 0 and result["sampler"] == "ddim" and result["eta"] == 1.0


def test_bench_samples_at_the_models_own_size_not_the_data_sections():
    """`diffalign bench pipelines/shapes-grpo.yaml --sampling` samples the Shapes base at its 64 px (the
    data section's default 512 is a training size such a recipe never sets); a method resolution wins."""
    from diffalign.models.loading import load_backbone, resolve_pretrained
    from diffalign.trainers.bench import sampling_resolution
    from diffalign.trainers.registry import load_recipe

    recipe = load_recipe("shapes-grpo")
    backbone = load_backbone(resolve_pretrained(recipe.model.pretrained))
    assert recipe.data.resolution == 512 and sampling_resolution(recipe, backbone) == 64
    assert sampling_resolution(load_recipe("shapes-grpo", ["method.resolution=32"]), backbone) == 32
