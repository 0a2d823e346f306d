"""The shared core: forward processes, denoising likelihoods, samplers with log-probs, backprop sampling.

* :mod:`~diffalign.core.forward` — noising processes per schedule family (DDPM ε/v, flow matching).
* :mod:`~diffalign.core.likelihood` — per-sample denoising error and its ELBO surrogate (offline methods).
* :mod:`~diffalign.core.sampling` — stochastic samplers (DDIM-η, flow SDE) recording a
  :class:`Trajectory` with per-step transition log-probs; rescoring under policy or reference.
* :mod:`~diffalign.core.backprop` — sampling with gradients: checkpointed, truncated (DRaFT-K), ReFL x̂0.
* :mod:`~diffalign.core.inversion` — DDIM / flow ODE inversion (η noise, ReNoise) and the re-parametrised target.
"""

from diffalign.core.backprop import (
    BackpropOutput,
    ReFLOutput,
    predict_x0,
    refl_step_range,
    refl_x0,
    sample_with_grad,
)
from diffalign.core.forward import (
    DDPMForward,
    FlowMatchingForward,
    ForwardProcess,
    NoisyBatch,
    forward_process_from_scheduler,
)
from diffalign.core.inversion import (
    InversionOutput,
    InversionStep,
    inversion_levels,
    invert,
    reparametrised_noise,
    reparametrised_target,
)
from diffalign.core.likelihood import denoising_error, elbo_loglik
from diffalign.core.sampling import (
    DDIMSampler,
    FlowSDESampler,
    Sampler,
    StepOutput,
    Trajectory,
    TransitionLogProbs,
    denoise_step,
    gaussian_kl,
    gaussian_log_prob,
    guided_prediction,
    initial_latents,
    make_sampler,
    sample_trajectory,
    sampler_from_config,
    transition_log_probs,
)

__all__ = [
    "BackpropOutput", "DDIMSampler", "DDPMForward", "FlowMatchingForward", "FlowSDESampler", "ForwardProcess",
    "NoisyBatch", "ReFLOutput", "Sampler", "StepOutput", "Trajectory", "TransitionLogProbs", "denoise_step",
    "denoising_error", "elbo_loglik", "forward_process_from_scheduler", "gaussian_kl", "gaussian_log_prob",
    "guided_prediction", "initial_latents", "make_sampler", "predict_x0", "refl_step_range", "refl_x0",
    "sample_trajectory", "sample_with_grad", "sampler_from_config", "transition_log_probs",
    "InversionOutput", "InversionStep", "inversion_levels", "invert", "reparametrised_noise", "reparametrised_target",
]
