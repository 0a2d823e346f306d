import contextlib
import math

import pytest
import torch

from diffalign.core.forward import (
    DDPMForward,
    FlowMatchingForward,
    forward_process_from_scheduler,
)
from diffalign.core.inversion import (
    inversion_levels,
    invert,
    reparametrised_noise,
    reparametrised_target,
)
from diffalign.core.sampling import denoise_step, make_sampler
from diffalign.models.base import Conditioning


class StubBackbone:
    """A denoiser whose output depends on the timestep only (plus an offset switched by reference()):
    DDIM / Euler steps with it are exactly invertible."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.forward_process = forward_process_from_scheduler(scheduler)
        self.dtype = torch.float32
        self.offset, self.calls = 0.0, 0
        g = torch.Generator().manual_seed(1)
        self.pattern = torch.randn(4, 8, 8, generator=g)

    def predict(self, x, t, cond):
        self.calls += x.shape[0]
        scale = (t.float() / 1000).reshape(-1, 1, 1, 1)
        return 0.3 * self.pattern * (1 + scale) + cond.prompt_embeds.mean((1, 2)).reshape(-1, 1, 1, 1) + self.offset

    @contextlib.contextmanager
    def reference(self):
        old, self.offset = self.offset, 0.0
        try:
            yield self
        finally:
            self.offset = old


def _ddim(prediction_type="epsilon"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def _flow():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _cond(b):
    return Conditioning(torch.arange(b, dtype=torch.float32).reshape(b, 1, 1).expand(b, 2, 3) * 0.1)


def _sample_back(bb, x_t, start, n, cond):
    """DDIM (η=0) / Euler sampling on the n-step grid from step index ``start`` to the end."""
    sampler = make_sampler(bb, n, eta=0.0)
    x = x_t
    for i in range(start, n):
        x = denoise_step(bb, sampler, x, i, cond).prev_sample
    return x


@pytest.mark.parametrize("scheduler", [_ddim("epsilon"), _ddim("v_prediction"), _flow()], ids=["eps", "v", "flow"])
def test_reparametrised_noise_gives_x_t_exactly(scheduler):
    fp = forward_process_from_scheduler(scheduler)
    g = torch.Generator().manual_seed(0)
    x0, x_t = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 420, 999]) if isinstance(fp, DDPMForward) else torch.tensor([3.0, 420.0, 1000.0])
    noise, target = reparametrised_target(fp, x0, x_t, t)
    torch.testing.assert_close(fp.add_noise(x0, noise, t), x_t, rtol=0, atol=2e-5)
    if isinstance(fp, FlowMatchingForward):
        torch.testing.assert_close(target, noise - x0)
    elif fp.prediction_type == "v_prediction":
        a = fp.alphas_cumprod[t].float().reshape(-1, 1, 1, 1)
        torch.testing.assert_close(target, a.sqrt() * noise - (1 - a).sqrt() * x0)  # v, by hand
    else:
        torch.testing.assert_close(target, noise)
    # by hand at one element: ε̂ = (x_t − √ᾱ x0)/√(1−ᾱ) or (x_t − (1−σ) x0)/σ
    if isinstance(fp, DDPMForward):
        a = float(fp.alphas_cumprod[420])
        expect = (x_t[1, 0, 0, 0] - math.sqrt(a) * x0[1, 0, 0, 0]) / math.sqrt(1 - a)
    else:
        expect = (x_t[1, 0, 0, 0] - 0.58 * x0[1, 0, 0, 0]) / 0.42
    assert float(reparametrised_noise(fp, x0, x_t, t)[1, 0, 0, 0]) == pytest.approx(float(expect), rel=1e-5)


def test_first_step_by_hand():
    bb = StubBackbone(_ddim())
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = _cond(1)
    out = invert(bb, x0, torch.tensor([1]), cond, model="policy", num_steps=10)
    a0 = float(bb.scheduler.alphas_cumprod[0])  # the clean latent's ᾱ (set_alpha_to_one=False)
    a1 = float(bb.scheduler.alphas_cumprod[1])
    eps = bb.predict(x0, torch.tensor([1]), cond)  # the model is called at the level reached
    x0_hat = (x0 - math.sqrt(1 - a0) * eps) / math.sqrt(a0)
    torch.testing.assert_close(out.x_t, math.sqrt(a1) * x0_hat + math.sqrt(1 - a1) * eps)
    assert out.model_calls == 1
    # off the grid: levels 1, 101, 201 then one step to 250
    out = invert(bb, x0, torch.tensor([250]), cond, model="policy", num_steps=10, return_trajectory=True)
    assert [int(s.timesteps[0]) for s in out.trajectory] == [1, 101, 201, 250]


@pytest.mark.parametrize("scheduler", [_ddim("epsilon"), _ddim("v_prediction"), _flow()], ids=["eps", "v", "flow"])
def test_inversion_is_the_exact_mirror_of_sampling(scheduler):
    """With a denoiser that ignores x, inverting then sampling on the same grid returns x0 exactly."""
    bb = StubBackbone(scheduler)
    n = 8
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = _cond(2)
    levels = inversion_levels(bb, n)
    for k in (n, 3):  # the top level and a middle one
        t = levels[k - 1].repeat(2)
        out = invert(bb, x0, t, cond, model="policy", num_steps=n)
        assert out.model_calls == k  # one batched call per level
        back = _sample_back(bb, out.x_t, n - k, n, cond)
        torch.testing.assert_close(back, x0, rtol=0, atol=2e-4)


def test_round_trip_on_a_tiny_sd_model_converges(tmp_path):
    from diffalign import testing
    from diffalign.models import load_backbone

    bb = load_backbone(testing.make_tiny_sd(tmp_path / "sd"))
    x0 = 0.5 * torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = bb.encode_prompt(["a red hat", "a blue cat"])
    errors = []
    for n in (10, 40):
        k = 3 * n // 10  # timestep ~ 300
        t = inversion_levels(bb, n)[k - 1].repeat(2)
        out = invert(bb, x0, t, cond, model="policy", num_steps=n)
        errors.append(float((_sample_back(bb, out.x_t, n - k, n, cond) - x0).abs().max()))
        assert float((out.x_t - x0).abs().max()) > 0.3  # it did move
    assert errors[1] < errors[0] / 3  # first-order method: error ~ 1/n
    assert errors[1] < 0.08


def test_rows_with_different_timesteps_batch_like_single_rows():
    bb = StubBackbone(_ddim())
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = _cond(3)
    t = torch.tensor([999, 0, 350])
    batch = invert(bb, x0, t, cond, model="policy", num_steps=10)
    for i in range(3):
        one = invert(bb, x0[i:i + 1], t[i:i + 1], cond[i:i + 1], model="policy", num_steps=10)
        torch.testing.assert_close(batch.x_t[i:i + 1], one.x_t)
        torch.testing.assert_close(batch.target[i:i + 1], one.target)
    torch.testing.assert_close(bb.forward_process.add_noise(x0, batch.noise, t), batch.x_t, rtol=0, atol=2e-5)


def test_policy_or_reference_eta_and_renoise():
    bb = StubBackbone(_ddim())
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond, t = _cond(2), torch.tensor([500, 500])
    bb.offset = 0.05  # the policy has moved away from the reference
    pol = invert(bb, x0, t, cond, model="policy", num_steps=10)
    ref = invert(bb, x0, t, cond, model="reference", num_steps=10)
    assert bb.offset == 0.05
    assert float((pol.x_t - ref.x_t).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="policy' or 'reference"):
        invert(bb, x0, t, cond, model="ema", num_steps=10)

    def noisy(seed):
        return invert(bb, x0, t, cond, model="policy", num_steps=10, eta=0.1,
                      generator=torch.Generator().manual_seed(seed))
    a, b, c = noisy(0), noisy(0), noisy(1)
    torch.testing.assert_close(a.x_t, b.x_t, rtol=0, atol=0)
    assert float((a.x_t - c.x_t).abs().max()) > 1e-3 and float((a.x_t - pol.x_t).abs().max()) > 1e-3
    torch.testing.assert_close(bb.forward_process.add_noise(x0, a.noise, t), a.x_t, rtol=0, atol=2e-5)

    bb.calls = 0
    rn = invert(bb, x0, t, cond, model="policy", num_steps=10, renoise_steps=1)
    assert rn.model_calls == 2 * 6 and bb.calls == 2 * 2 * 6  # 6 levels (1..501), two passes each, 2 rows
    with pytest.raises(ValueError, match="eta"):
        invert(StubBackbone(_flow()), x0, torch.tensor([500.0, 500.0]), cond, model="policy", eta=0.1)


def test_renoise_with_smpo_one_pass_by_hand():
    """ReNoise with one extra pass: the step uses the mean of the predictions at x_a and at the first guess."""

    class Linear(StubBackbone):
        def predict(self, x, t, cond):
            return 0.1 * x + 0.2

    bb = Linear(_ddim())
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    out = invert(bb, x0, torch.tensor([1]), _cond(1), model="policy", num_steps=10, renoise_steps=1)
    a0, a1 = float(bb.scheduler.alphas_cumprod[0]), float(bb.scheduler.alphas_cumprod[1])

    def step(eps):
        return math.sqrt(a1) * (x0 - math.sqrt(1 - a0) * eps) / math.sqrt(a0) + math.sqrt(1 - a1) * eps

    e1 = 0.1 * x0 + 0.2
    e2 = 0.1 * step(e1) + 0.2
    torch.testing.assert_close(out.x_t, step((e1 + e2) / 2))
