"""PRDP (Deng et al., CVPR 2024): reward difference prediction, a supervised regression on pairs of on-line
samples with proximal updates (:func:`diffalign.objectives.prdp.reward_difference_loss`)::

    r̂_θ(x̄) = mean_t [log π_θ(x_{t+1}|x_t) − log π_ref(x_{t+1}|x_t)]          per trajectory
    L      = mean_{a, b of one prompt, R_ab > 0} max((D_ab − R_ab/β)², (Dc_ab − R_ab/β)²)

with ``D_ab = r̂_θ(x̄^a) − r̂_θ(x̄^b)``, ``R_ab`` the reward difference of the two final images and ``Dc`` the
same difference after clipping each per-step log-ratio to the sampling policy's ``± ε``. No public code
exists; this follows the Jax listing of the paper's appendix G and its Table 4 (small-scale column).

Each epoch samples ``prompts_per_epoch`` prompts × ``images_per_prompt`` trajectories (π_old = the policy at
sampling time), scores them, and runs ``num_inner_epochs`` passes (the paper's K updates per epoch) of
optimizer steps over minibatches of ``train.batch_size`` whole groups. Each group trains on a random subset
of ``K = max(1, int(S·timestep_fraction))`` stochastic steps (all of them by default, as the listing), the
same steps for every trajectory of the group.

Gradient, one step's graph at a time: ``L`` is a function of the per-step log-ratios ``l_ik``, so
``∇L = Σ_ik (∂L/∂l_ik) ∇l_ik``. At the first micro-batch of a minibatch every ``l_ik`` is computed without
gradient and ``c_ik = ∂L/∂l_ik`` taken by autograd through the pure loss; micro-batch ``k`` then
backpropagates ``K · Σ_i c_ik · l_ik`` through step ``k`` only (its reported value is ``L``). This is the exact
gradient of ``L`` (the parameters do not change within an optimizer step) at the memory of one denoiser
call, for one extra no-grad pass over the steps.

Reference (``reference``): ``base`` (the paper's π_ref, the LoRA disabled), computed once per transition and
cached (the first rollout's stored log-probs are the base model's and are reused); ``rollout`` takes the
sampling policy itself as π_ref (an iterated trust-region form: ``D = 0`` at every epoch's first update).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffalign.core.sampling import Trajectory, transition_log_probs
from diffalign.objectives.prdp import reward_difference_loss
from diffalign.trainers.method import StepOutput, register_method
from diffalign.trainers.online import (
    Micro,
    OnlineMethod,
    Rollout,
    RolloutConfig,
    build_reward,
    gather_float,
    load_prompts,
    trainable_steps,
)


@dataclass
class PRDPConfig(RolloutConfig):
    """PRDP; defaults from the paper's Table 4, small-scale column (SD1.4, full UNet, 45 animal prompts) unless
    noted. Table 4's AdamW settings (lr 1e-5, weight decay 1e-4, grad clip 1.0) go in the ``train`` section.

    Attributes:
        reward, reward_options, reward_normalize: the reward model (a registered name or ``{name: weight}``),
            as for DDPO (required).
        images_per_prompt: ``B`` trajectories per prompt (16); all ordered pairs of a group are trained.
        prompts_per_epoch: ``N`` prompts per epoch and process (32).
        num_steps: DDPM-type sampler steps (50, DDIM with η = 1).
        eta: sampler stochasticity (1.0: the paper samples with DDPM).
        guidance_scale: CFG weight (5.0).
        num_inner_epochs: ``K`` passes over each rollout (10 updates per epoch, small scale; 1 at large scale).
        beta: the KL weight ``β`` dividing the reward difference (3e-5; 3e-6 at large scale). On the scale of
            mean-reduced log-probs (``reduction: mean``), as the Table's values.
        clip_range: stepwise clip ``ε`` of the log-ratio around the sampling policy's (1e-6; 1e-4 at scale).
        reference: ``base`` (π_ref = the LoRA disabled, the paper) or ``rollout`` (module docstring).
        same_initial_noise: every image of a group starts from the same noise (off: the paper draws each).
    """

    reward: str | dict[str, float] = ""
    reward_options: dict[str, dict] = field(default_factory=dict)
    reward_normalize: str | None = "batch"
    images_per_prompt: int = 16
    prompts_per_epoch: int = 32
    num_steps: int = 50
    eta: float | None = 1.0
    guidance_scale: float = 5.0
    num_inner_epochs: int = 10
    beta: float = 3e-5
    clip_range: float = 1e-6
    reference: str = "base"
    same_initial_noise: bool = False


@dataclass
class GroupMicro(Micro):
    """One micro-batch of PRDP: ``units`` ``[g]`` group indices, ``steps`` ``[g]`` the step trained by this
    micro-batch, ``group_steps`` ``[g, K]`` every step of the minibatch (the loss needs all of them)."""

    group_steps: torch.Tensor | None = None
    column: int = 0
    minibatch: int = 0  # a number unique to the minibatch (its micro-batches share one optimizer step)


@register_method("prdp", PRDPConfig, kind="online")
class PRDP(OnlineMethod):
    """Reward difference prediction on groups of trajectories (module docstring)."""

    def __init__(self, config: PRDPConfig, backbone):
        super().__init__(config, backbone)
        if config.images_per_prompt < 2:
            raise ValueError("prdp compares images of one prompt: images_per_prompt must be >= 2")
        if config.reference not in ("base", "rollout"):
            raise ValueError(f"reference must be 'base' or 'rollout', not {config.reference!r}")
        if config.clip_range < 0:
            raise ValueError(f"clip_range must be >= 0, got {config.clip_range}")
        self.units_per_sample = config.images_per_prompt  # a unit is one prompt's group of trajectories
        self.prompts = load_prompts(config.prompts, config.prompt_options)
        self.reward = build_reward(config.reward, config.reward_options, config.reward_normalize)
        self.reward.to(backbone.device)
        self._values: tuple | None = None  # (minibatch, ∂L/∂l [n, K], L, metrics) of the current minibatch
        self._minibatches = 0

    # ---- rollout
    def rollout(self, run, epoch: int) -> Rollout:
        cfg, acc = self.config, run.accelerator
        g = cfg.images_per_prompt
        texts = [p for p in self.epoch_prompts(run, epoch, self.prompts) for _ in range(g)]
        traj = self.sample(run, texts, epoch, shared_noise=g if cfg.same_initial_noise else 1)
        rewards = self.reward.score(self.backbone.decode_latents(traj.final), texts).float().cpu()
        all_rewards = gather_float(acc, rewards)
        groups = all_rewards.view(-1, g)
        gaps = (groups[:, :, None] - groups[:, None, :]).abs()
        policy_is_reference = cfg.reference == "rollout" or run.global_step == 0
        ref = traj.log_probs.clone() if policy_is_reference else torch.full_like(traj.log_probs, float("nan"))
        metrics = {"reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std(unbiased=False)),
                   "reward_gap_mean": float(gaps.sum() / (gaps.numel() - gaps.shape[0] * g))}
        return Rollout(traj, texts, tensors={"rewards": rewards.to(traj.latents.device), "ref_log_probs": ref},
                       metrics=metrics)

    def plan(self, rollout: Rollout, run, generator: torch.Generator) -> list[list[Micro]]:
        """Shuffled groups in minibatches of ``train.batch_size``; each group its own random ``K`` stochastic
        steps; a minibatch is ``K`` micro-batches (one per step), ``gradient_accumulation_steps`` minibatches
        one optimizer step."""
        cfg = run.recipe.train
        steps = trainable_steps(self.sampler)
        k = max(1, int(len(steps) * self.config.timestep_fraction))
        n = self.num_units(rollout)
        order = torch.randperm(n, generator=generator)
        perms = torch.stack([steps[torch.randperm(len(steps), generator=generator)[:k]] for _ in range(n)])
        plan = []
        minibatches = list(order.split(cfg.batch_size))
        for start in range(0, len(minibatches), cfg.gradient_accumulation_steps):
            micros = []
            for mb in minibatches[start:start + cfg.gradient_accumulation_steps]:
                self._minibatches += 1
                micros += [GroupMicro(mb, perms[mb, j], group_steps=perms[mb], column=j, minibatch=self._minibatches)
                           for j in range(k)]
            plan.append(micros)
        return plan

    # ---- loss
    def loss(self, rollout: Rollout, micro: GroupMicro) -> StepOutput:
        g = self.config.images_per_prompt
        idx = (micro.units[:, None] * g + torch.arange(g)).reshape(-1)          # [n] trajectories
        steps = micro.group_steps.repeat_interleave(g, dim=0)                    # [n, K]
        traj = rollout.traj[idx]
        if self._values is None or self._values[0] != micro.minibatch:
            self._values = (micro.minibatch, *self._coefficients(rollout, idx, steps, traj))
        _, coef, loss_value, metrics = self._values
        j = micro.column
        new = transition_log_probs(self.backbone, traj, steps[:, j]).log_prob[:, 0]   # [n], with grad
        surrogate = (coef[:, j].to(new) * (new - new.detach())).sum() * steps.shape[1]
        return StepOutput(surrogate + loss_value, metrics)

    def _coefficients(self, rollout: Rollout, idx: torch.Tensor, steps: torch.Tensor, traj: Trajectory):
        """``(∂L/∂l [n, K], L, metrics)`` at the current weights, with every log-prob computed without grad."""
        cfg, g = self.config, self.config.images_per_prompt
        with torch.no_grad():
            logp = transition_log_probs(self.backbone, traj, steps).log_prob          # [n, K]
        ref = self._reference_log_probs(rollout, idx, steps, traj)
        rows = idx.to(traj.log_probs.device)[:, None]
        old = rollout.traj.log_probs[rows, steps.to(traj.log_probs.device)]
        log_ratio = (logp - ref).detach().requires_grad_(True)
        out = reward_difference_loss(log_ratio, old - ref, rollout.tensors["rewards"][idx], group_size=g,
                                     beta=cfg.beta, clip_range=cfg.clip_range)
        if out.losses.numel():
            loss = out.losses.mean()
            (coef,) = torch.autograd.grad(loss, log_ratio)
        else:  # every group tied: nothing to regress
            loss, coef = log_ratio.sum() * 0.0, torch.zeros_like(log_ratio)
        pred = out.predicted.detach()
        metrics = {"rdp_loss": loss.detach(), "pairs": torch.tensor(float(out.losses.numel())),
                   "pred_diff_abs_mean": pred.abs().mean() if pred.numel() else torch.tensor(0.0),
                   "pred_diff_abs_max": pred.abs().max() if pred.numel() else torch.tensor(0.0),
                   "target_abs_mean": out.target.abs().mean() if pred.numel() else torch.tensor(0.0),
                   "log_ratio_abs_max": log_ratio.detach().abs().max(),
                   "ratio_max_dev": (torch.exp(logp - old) - 1).abs().max(),
                   "clipfrac": out.clipped_frac}
        return coef.detach(), loss.detach(), metrics

    def _reference_log_probs(self, rollout: Rollout, idx: torch.Tensor, steps: torch.Tensor,
                             traj: Trajectory) -> torch.Tensor:
        """``[n, K]`` π_ref log-probs from the rollout's cache; missing ones computed (no grad, LoRA off)."""
        cache = rollout.tensors["ref_log_probs"]
        rows = idx.to(cache.device)[:, None].expand_as(steps)
        cols = steps.to(cache.device)
        values = cache[rows, cols]
        missing = torch.isnan(values)
        if missing.any():
            with torch.no_grad(), self.backbone.reference():
                fresh = transition_log_probs(self.backbone, traj, steps).log_prob
            cache[rows[missing], cols[missing]] = fresh[missing]
            values = torch.where(missing, fresh, values)
        return values
