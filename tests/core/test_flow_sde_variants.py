"""The flow SDE sampler's options: CPS (``sde_type="cps"``) and SDE windows (``sde_window``). Step maths by
hand, the coefficient-preserving claim on an exact velocity field, and rescoring on the tiny SD3."""

import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffalign.core.sampling import (
    FlowSDESampler,
    make_sampler,
    sample_trajectory,
    sampler_from_config,
    transition_log_probs,
)

PROMPTS = ["a photo of a red cat", "a dog", "blue square and the hat", ""]


def _config(shift=3.0):
    return dict(FlowMatchEulerDiscreteScheduler(shift=shift).config)


def _shifted_sigmas(T, shift=3.0):
    shifted = lambda s: shift * s / (1 + (shift - 1) * s)
    s = torch.linspace(1.0, shifted(1 / 1000), T, dtype=torch.float64)
    return torch.cat([shifted(s), torch.zeros(1, dtype=torch.float64)])


# ------------------------------------------------------------------ CPS step by hand
@pytest.mark.parametrize("step", [0, 3, 5])
def test_cps_step_matches_hand_computation(step):
    T, eta = 6, 0.8
    sampler = FlowSDESampler(_config(), num_steps=T, noise_level=eta, sde_type="cps")
    sig = _shifted_sigmas(T)
    g = torch.Generator().manual_seed(step)
    x, v, x_next = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    s, sn = sig[step], sig[step + 1]
    std = sn * math.sin(eta * math.pi / 2)                       # σ' sin(ηπ/2)
    x0_hat, x1_hat = x - s * v, x + (1 - s) * v
    mean = (1 - sn) * x0_hat + (sn**2 - std**2).sqrt() * x1_hat
    logp = -((x_next - mean) ** 2).flatten(1).mean(1)           # flow_grpo: constants dropped

    res = sampler.step(v.float(), step, x.float(), prev_sample=x_next.float())
    torch.testing.assert_close(res.std.flatten().double(), std.expand(2), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(res.mean.double(), mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.pred_x0.double(), x0_hat, rtol=1e-5, atol=1e-5)
    if step == T - 1:  # σ' = 0: no noise, log-prob reported as 0
        assert (res.std == 0).all() and (res.log_prob == 0).all()
    else:
        torch.testing.assert_close(res.log_prob.double(), logp, rtol=1e-4, atol=1e-4)
    summed = FlowSDESampler(_config(), num_steps=T, noise_level=eta, sde_type="cps", reduction="sum")
    if step < T - 1:
        torch.testing.assert_close(summed.step(v.float(), step, x.float(), prev_sample=x_next.float()).log_prob.double(),
                                   logp * 256, rtol=1e-4, atol=1e-3)


def test_cps_at_zero_noise_is_the_euler_step():
    T = 5
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    cps = FlowSDESampler(dict(sched.config), num_steps=T, noise_level=0.0, sde_type="cps")
    sched.set_timesteps(T)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    assert (cps.stds == 0).all()
    for i in range(T):
        expected = sched.step(v, sched.timesteps[i], x).prev_sample
        torch.testing.assert_close(cps.step(v, i, x).prev_sample, expected, rtol=0, atol=1e-6)


def test_cps_preserves_the_forward_marginal_and_the_flow_sde_does_not():
    """Data = one point x0: the exact velocity is v(x, σ) = (x − x0)/σ and the forward marginal at σ is
    N((1 − σ) x0, σ² I). CPS's coefficient identity (1 − σ')x̂0 + √(σ'² − s²)x̂1 + s z, with x̂0 = x0 and
    x̂1 = ε exact, keeps that marginal at every step of the discrete chain; Flow-GRPO's SDE leaves excess
    noise (its discretisation is exact only as dt → 0), down to a noisy final sample."""
    T, N, D = 10, 20000, 8
    x0 = torch.randn(1, D, generator=torch.Generator().manual_seed(0))
    # the identity on one step, exactly: the noise coefficients' squares sum to σ'²
    cps = FlowSDESampler(_config(), num_steps=T, noise_level=0.8, sde_type="cps")
    eps, z = torch.randn(3, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64).chunk(3)[:2]
    for i in range(T - 1):
        s_, sn, std = cps.sigmas[i].double(), cps.sigmas[i + 1].double(), cps.stds[i].double()
        x = (1 - s_) * x0.double() + s_ * eps
        out = cps.step(((x - x0) / s_).float(), i, x.float(), noise=z.float())
        coef = (sn**2 - std**2).sqrt()
        torch.testing.assert_close(out.prev_sample.double(), (1 - sn) * x0 + coef * eps + std * z, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(coef**2 + std**2, sn**2, rtol=1e-6, atol=1e-9)
    # the whole chain, empirically
    residual_std = {}
    for sde_type, level in (("cps", 0.8), ("sde", 0.7)):
        sampler = FlowSDESampler(_config(), num_steps=T, noise_level=level, sde_type=sde_type)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(N, D, generator=g)
        stds = []
        for i in range(T):
            x = sampler.step((x - x0) / sampler.sigmas[i], i, x, noise=torch.randn(N, D, generator=g)).prev_sample
            stds.append(float((x - (1 - sampler.sigmas[i + 1]) * x0).std()))
        residual_std[sde_type] = torch.tensor(stds)
    target = cps.sigmas[1:]
    torch.testing.assert_close(residual_std["cps"][:-1], target[:-1], rtol=0.02, atol=1e-3)  # std = σ'
    assert residual_std["cps"][-1] == 0  # a clean sample
    assert (residual_std["sde"][2:-1] > 1.05 * target[2:-1]).all()  # excess noise at every later step (8-28%)
    assert residual_std["sde"][-1] > 0.05


# ------------------------------------------------------------------ SDE windows
@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_window_noise_only_inside_and_ode_elsewhere(sde_type):
    T = 8
    full = FlowSDESampler(_config(), num_steps=T, noise_level=0.8, sde_type=sde_type)
    win = full.with_window((2, 5))
    assert win.sde_window == (2, 5) and full.sde_window is None
    inside = torch.zeros(T, dtype=torch.bool)
    inside[2:5] = True
    assert (win.stds[inside] > 0).all() and (win.stds[~inside] == 0).all()
    torch.testing.assert_close(win.stds[inside], full.stds[inside], rtol=0, atol=0)
    ode = FlowSDESampler(_config(), num_steps=T, noise_level=0.0)
    g = torch.Generator().manual_seed(0)
    x, v, x_next = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for i in range(T):
        out = win.step(v, i, x, prev_sample=x_next)
        if inside[i]:  # the full sampler's step
            ref = full.step(v, i, x, prev_sample=x_next)
            assert torch.equal(out.mean, ref.mean) and torch.equal(out.log_prob, ref.log_prob)
        else:          # Euler (CPS's η = 0 form equals it up to float round-off), deterministic, no log-prob
            torch.testing.assert_close(out.mean, ode.step(v, i, x).mean, rtol=0, atol=1e-5)
            assert (out.std == 0).all() and (out.log_prob == 0).all()
    for bad in ((3, 3), (-1, 2), (0, T + 1)):
        with pytest.raises(ValueError, match="sde_window"):
            full.with_window(bad)
    with pytest.raises(ValueError, match="sde_type"):
        FlowSDESampler(_config(), sde_type="dance")


# ------------------------------------------------------------------ on the tiny SD3
@pytest.fixture
def sd3(tiny_folder):
    from diffalign.models import load_backbone

    backbone = load_backbone(tiny_folder("sd3"))
    backbone.add_lora(rank=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in backbone.raw_denoiser.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return backbone


@pytest.mark.parametrize("sde_type, window", [("cps", None), ("cps", (1, 3)), ("sde", (0, 2))])
def test_recomputed_log_probs_equal_stored(sd3, sde_type, window):
    sampler = make_sampler(sd3, num_steps=4, eta=0.8, sde_type=sde_type, sde_window=window)
    traj = sample_trajectory(sd3, sampler, sd3.encode_prompt(PROMPTS), guidance_scale=3.0,
                             generator=torch.Generator().manual_seed(0), record_means=True)
    stochastic = sampler.stds > 0
    assert (traj.log_probs[:, ~stochastic] == 0).all() and (traj.log_probs[:, stochastic] != 0).all()
    scored = transition_log_probs(sd3, traj)
    assert torch.equal(scored.log_prob, traj.log_probs)                 # the PPO ratio is exactly 1
    assert torch.equal(scored.mean, traj.means)                         # μ_old as stored
    # the stored transitions are μ + s z with z standard normal where stochastic
    if sde_type == "cps":
        noise = (traj.latents[:, 1:] - traj.means)[:, stochastic] / sampler.stds[stochastic].reshape(1, -1, 1, 1, 1)
        assert abs(float(noise.std()) - 1) < 0.15
        torch.testing.assert_close(traj.log_probs[:, stochastic],
                                   -((traj.latents[:, 1:] - traj.means)[:, stochastic] ** 2).flatten(2).mean(2))
    # outside the window the latents follow the ODE of the same model from the same start
    if window is not None:
        ode = make_sampler(sd3, num_steps=4, eta=0.0)
        ode_traj = sample_trajectory(sd3, ode, sd3.encode_prompt(PROMPTS), guidance_scale=3.0,
                                     latents=traj.latents[:, 0])
        torch.testing.assert_close(ode_traj.latents[:, : window[0] + 1], traj.latents[:, : window[0] + 1],
                                   rtol=0, atol=1e-5)  # bit for bit with sde; CPS's η = 0 form: round-off
        assert not torch.allclose(ode_traj.final, traj.final)
    # the sampler rebuilds from its JSON config (stored with trajectories and in run files)
    again = sampler_from_config(json.loads(json.dumps(sampler.config)))
    assert again.sde_type == sde_type and again.sde_window == window
    assert torch.equal(again.stds, sampler.stds)


def test_sde_options_refused_on_ddim_models(tiny_folder):
    from diffalign.models import load_backbone

    with pytest.raises(ValueError, match="flow SDE sampler"):
        make_sampler(load_backbone(tiny_folder("sd")), num_steps=3, sde_type="cps")


def test_bench_sampling_with_cps_and_a_window(tiny_folder, tmp_path):
    from diffalign.cli import main

    results = {}
    for name, extra in (("sde", []), ("cps-window", ["--sde-type", "cps", "--sde-window", "0,2"])):
        out = tmp_path / f"{name}.json"
        assert main(["bench", "-", "--sampling", f"--model.pretrained={tiny_folder('sd3')}", "--method.name=flow-grpo",
                     "--method.resolution=32", "--num-steps", "4", "--batch-size", "2", "--steps", "1",
                     "--warmup", "0", "--json", str(out), *extra]) == 0
        results[name] = json.loads(out.read_text())
    assert results["sde"]["sde_type"] == "sde" and results["sde"]["sde_window"] is None
    r = results["cps-window"]
    assert r["sampler"] == "flow_sde" and r["sde_type"] == "cps" and r["sde_window"] == [0, 2]
    assert r["trajectories_per_s"] > 0 and r["stochastic_steps"] == 2
