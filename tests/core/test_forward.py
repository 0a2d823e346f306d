import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffalign.core.forward import DDPMForward, FlowMatchingForward, forward_process_from_scheduler


def test_ddpm_matches_diffusers_add_noise_and_velocity():
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", prediction_type="v_prediction")
    fp = forward_process_from_scheduler(sched)
    assert isinstance(fp, DDPMForward) and fp.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    torch.testing.assert_close(fp.add_noise(x0, noise, t), sched.add_noise(x0, noise, t))
    torch.testing.assert_close(fp.target(x0, noise, t), sched.get_velocity(x0, noise, t))
    x_t = fp.add_noise(x0, noise, t)
    torch.testing.assert_close(fp.x0_from_prediction(x_t, fp.target(x0, noise, t), t), x0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fp.eps_from_prediction(x_t, fp.target(x0, noise, t), t), noise, atol=1e-4, rtol=1e-4)


def test_pairs_share_noise_and_timestep_and_each_example_its_own_generator():
    fp = DDPMForward(DDPMScheduler().alphas_cumprod)
    x0 = torch.randn(6, 4, 8, 8)  # 3 winners then 3 losers

    def gens(*seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    nb = fp.noise_examples(x0, gens(1, 2, 3), group_size=2)
    torch.testing.assert_close(nb.noise[:3], nb.noise[3:])
    assert nb.timesteps[:3].tolist() == nb.timesteps[3:].tolist()
    assert not torch.equal(nb.noise[0], nb.noise[1])
    # by hand: example i's generator draws its noise, then its timestep
    g = torch.Generator().manual_seed(2)
    noise1, t1 = torch.randn(4, 8, 8, generator=g), fp.sample_timesteps(1, generator=g)
    torch.testing.assert_close(nb.noise[1], noise1)
    assert int(nb.timesteps[4]) == int(t1)
    torch.testing.assert_close(nb.x_t, fp.add_noise(x0, nb.noise, nb.timesteps))
    # an example's noise does not depend on the other examples of its batch
    alone = fp.noise_examples(x0[[1, 4]], gens(2), group_size=2)
    torch.testing.assert_close(alone.noise[0], nb.noise[1])
    with pytest.raises(ValueError, match="not 2 members x 2 examples"):
        fp.noise_examples(x0, gens(1, 2), group_size=2)


def test_flow_matching_interpolation_and_target():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    fp = forward_process_from_scheduler(sched)
    assert isinstance(fp, FlowMatchingForward) and fp.timestep_sampling == "logit_normal"
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    t = torch.tensor([250.0, 750.0])
    x_t = fp.add_noise(x0, noise, t)
    torch.testing.assert_close(x_t[0], 0.75 * x0[0] + 0.25 * noise[0])
    torch.testing.assert_close(fp.target(x0, noise, t), noise - x0)
    torch.testing.assert_close(fp.x0_from_prediction(x_t, noise - x0, t), x0, atol=1e-5, rtol=1e-5)
    s = fp.sample_timesteps(10000, generator=torch.Generator().manual_seed(0)) / 1000
    # shift 3 moves the logit-normal median 0.5 to 3*0.5/(1+2*0.5) = 0.75
    assert abs(s.median().item() - 0.75) < 0.02


def test_logit_normal_ddpm_timesteps_in_range():
    fp = DDPMForward(DDPMScheduler().alphas_cumprod, timestep_sampling="logit_normal")
    t = fp.sample_timesteps(5000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999 and abs(t.float().mean().item() - 500) < 20
