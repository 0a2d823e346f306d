"""DDPO and the GRPO family: policy gradient on the denoising chain with a PPO-clipped ratio.

Each denoising step is a Gaussian action (:mod:`diffalign.core.sampling`). For a stored transition
``j`` of trajectory ``i`` with advantage ``A_i`` (clipped to ``±adv_clip_max``)::

    ρ = exp(log π_θ(x_{j+1} | x_j, c) − log π_old(x_{j+1} | x_j, c))      π_old: stored at sampling
    L = mean( max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)) ) + β_KL · KL(π_θ(·|x_j) ‖ π_ref(·|x_j))

(ddpo-pytorch ``scripts/train.py``; Flow-GRPO adds the KL to the reference = LoRA disabled, the
exact Gaussian KL ``mean((μ_θ − μ_ref)²) / (2 s²)``, :func:`~diffalign.core.sampling.gaussian_kl`).

Advantages from the rewards of an epoch (all processes gathered):

* ``prompt_buffer`` (DDPO): per-prompt running statistics over the last ``buffer_size`` rewards of
  that prompt (kept across epochs); the whole batch's statistics until ``min_count`` are seen
  (ddpo-pytorch ``stat_tracking.py``; its std gets ``+1e-6``).
* ``group`` (GRPO, DanceGRPO, Pref-GRPO): ``(r − mean_g) / (std_g + eps)`` over the
  ``images_per_prompt`` images of one prompt.
* ``group_global_std`` (Flow-GRPO ``global_std=True``): group mean, std of the whole epoch.
* ``batch``: ``(r − mean) / (std + eps)`` over the epoch (TRL's default, no per-prompt tracking).

Stds are population stds (numpy's, as ddpo-pytorch and Flow-GRPO compute them). The reward is any
registered reward model, a weighted mix ``{name: weight}`` (each normalised within the epoch), or
with ``win_rate`` the Pref-GRPO pairwise win rate of each image within its group
(:func:`diffalign.rewards.combine.win_rates`, ties ½).

The sampler follows the model: DDIM with η on SD1.x/2.x/SDXL (DDPO), the flow SDE on SD3
(Flow-GRPO). Methods: ``ddpo``, ``grpo``, ``flow-grpo``, ``pref-grpo`` (same loss; their configs
carry each original's defaults). The flow-SDE variants ``flow-grpo-fast``, ``mixgrpo`` and
``grpo-guard`` build on these in :mod:`diffalign.trainers.flow_grpo_variants`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffalign.core.sampling import gaussian_kl, transition_log_probs
from diffalign.objectives.online import group_advantages, ppo_clip_loss
from diffalign.trainers.method import StepOutput, register_method
from diffalign.trainers.online import (
    Micro,
    OnlineMethod,
    Rollout,
    RolloutConfig,
    build_reward,
    gather_float,
    load_prompts,
)

ADVANTAGE_MODES = ("prompt_buffer", "group", "group_global_std", "batch")


@dataclass
class DDPOConfig(RolloutConfig):
    """DDPO (Black et al., 2023); defaults from ddpo-pytorch ``config/base.py`` unless noted.

    Attributes:
        reward: a registered reward name, or ``{name: weight}`` for a weighted mix (required).
        reward_options: loading keyword arguments per reward name (``{"pickscore": {"dtype": ...}}``).
        reward_normalize: how a mix normalises each reward: ``batch`` (z-score in the epoch),
            ``card`` (the cards' fixed statistics) or None.
        win_rate: replace each reward by its Pref-GRPO win rate within the prompt's group.
        win_rate_temperature: soft win probability ``σ(Δ/τ)`` instead of ``1[Δ > 0] + ½·1[Δ = 0]``.
        images_per_prompt: group size: images sampled per drawn prompt (1 in ddpo-pytorch, whose
            per-prompt tracker groups repeats of a prompt across the batch and epochs).
        advantage: one of ``prompt_buffer``, ``group``, ``group_global_std``, ``batch`` (module
            docstring).
        buffer_size, min_count: the per-prompt tracker's window and warm-up (16, 16).
        adv_eps: added to the std (Flow-GRPO's 1e-4; avoids amplifying ties of near-equal rewards).
        adv_clip_max: advantages are clipped to ``±adv_clip_max`` (5).
        clip_range: PPO ratio clip ε (1e-4: the ratio is of mean-reduced log-probs).
        kl_beta: weight of the KL to the reference model (0: DDPO has no KL).
        same_initial_noise: every image of a group starts from the same noise (DanceGRPO's
            ``init_same_noise``).
        async_reward: score each sampler call's images while the next call samples (ddpo-pytorch's
            ``async_reward_computation``, off there too): worth it for a served reward (``reward:
            remote:URL``, ``diffalign reward serve``), whose requests run on a worker thread. Each call's
            images are then decoded on their own; the scores, and so the run, equal the synchronous ones
            whenever the VAE decode does not depend on how the batch is split (checked on Shapes).
    """

    num_steps: int = 50
    eta: float | None = 1.0
    reward: str | dict[str, float] = ""
    reward_options: dict[str, dict] = field(default_factory=dict)
    reward_normalize: str | None = "batch"
    win_rate: bool = False
    win_rate_temperature: float | None = None
    images_per_prompt: int = 1
    advantage: str = "prompt_buffer"
    buffer_size: int = 16
    min_count: int = 16
    adv_eps: float = 1e-4
    adv_clip_max: float = 5.0
    clip_range: float = 1e-4
    kl_beta: float = 0.0
    same_initial_noise: bool = False
    async_reward: bool = False


@dataclass
class GRPOConfig(DDPOConfig):
    """GRPO on a DDIM model (DanceGRPO's SD script, ``train_grpo_sd.py``): 50 steps, η 1, CFG 5,
    groups of 16 (its hpsv2 config), per-group std, clip 1e-4, no KL."""

    images_per_prompt: int = 16
    prompts_per_epoch: int = 4
    advantage: str = "group"


@dataclass
class FlowGRPOConfig(DDPOConfig):
    """Flow-GRPO (yifan123/flow_grpo, ``config/grpo.py`` geneval_sd3): SD3 flow SDE with noise
    level 0.7, 10 training steps, CFG 4.5, groups of 24, group mean with the epoch's std
    (``global_std``), steps ``[0, int(0.99·T))`` trained, clip 1e-4, β_KL 0.04 (0.01 PickScore)."""

    num_steps: int = 10
    eta: float | None = 0.7
    guidance_scale: float = 4.5
    images_per_prompt: int = 24
    prompts_per_epoch: int = 48
    advantage: str = "group_global_std"
    timestep_fraction: float = 0.99
    kl_beta: float = 0.04


@dataclass
class PrefGRPOConfig(DDPOConfig):
    """Pref-GRPO (CodeGoat24/Pref-GRPO): the reward is each image's win rate in its group of 8,
    group-normalised; flow SDE noise 0.7, 25 steps, timestep_fraction 0.6, clip 1e-4, no KL, same
    initial noise in a group. Its pairwise judge (UnifiedReward-Think, a VLM) is replaced by the
    comparison of ``reward``'s scores."""

    num_steps: int = 25
    eta: float | None = 0.7
    win_rate: bool = True
    images_per_prompt: int = 8
    advantage: str = "group"
    timestep_fraction: float = 0.6
    same_initial_noise: bool = True


# ---------------------------------------------------------------------------------------- advantages
# group_advantages and ppo_clip_loss are in diffalign.objectives.online
class PerPromptStatTracker:
    """ddpo-pytorch's per-prompt reward statistics: the last ``buffer_size`` rewards of each prompt;
    until a prompt has ``min_count`` of them, the whole batch's mean and std are used."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        """Advantages ``[N]`` of ``rewards`` ``[N]`` (adds them to the buffers first)."""
        r = rewards.double()
        out = torch.empty_like(r)
        for prompt in dict.fromkeys(prompts):
            mask = torch.tensor([p == prompt for p in prompts])
            buf = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(r[mask].tolist())
            if len(buf) < self.min_count:
                mean, std = r.mean(), r.std(unbiased=False) + 1e-6
            else:
                ref = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = ref.mean(), ref.std(unbiased=False) + 1e-6
            out[mask] = (r[mask] - mean) / std
        return out.float()

    def state(self) -> dict[str, list[float]]:
        return {p: list(buf) for p, buf in self.stats.items()}

    def load(self, state: dict[str, list[float]]) -> None:
        self.stats = {p: deque(v, maxlen=self.buffer_size) for p, v in state.items()}


@register_method("ddpo", DDPOConfig, kind="online")
class DDPO(OnlineMethod):
    """Policy gradient with PPO clipping on stored trajectories (module docstring)."""

    def __init__(self, config: DDPOConfig, backbone):
        super().__init__(config, backbone)
        if config.advantage not in ADVANTAGE_MODES:
            raise ValueError(f"unknown advantage {config.advantage!r}; choose from {ADVANTAGE_MODES}")
        if config.win_rate and config.images_per_prompt < 2:
            raise ValueError("win_rate needs images_per_prompt >= 2 (a group to compare within)")
        if config.advantage.startswith("group") and config.images_per_prompt < 2:
            raise ValueError(f"advantage {config.advantage!r} needs images_per_prompt >= 2")
        self.prompts = load_prompts(config.prompts, config.prompt_options)
        self.reward = build_reward(config.reward, config.reward_options, config.reward_normalize)
        self.reward.to(backbone.device)
        self.tracker = PerPromptStatTracker(config.buffer_size, config.min_count)

    # ---- rollout
    def rollout(self, run, epoch: int) -> Rollout:
        cfg, acc = self.config, run.accelerator
        g = cfg.images_per_prompt
        texts = [p for p in self.epoch_prompts(run, epoch, self.prompts) for _ in range(g)]
        traj, raw = self.sample_and_score(run, texts, epoch, self.reward, overlap=cfg.async_reward,
                                          shared_noise=g if cfg.same_initial_noise else 1)
        all_raw = gather_float(acc, raw)
        all_texts = _gather_texts(acc, texts)
        rewards = raw_to_rewards(all_raw, g, cfg)
        adv = self.advantages(rewards, all_texts)
        n, p = len(texts), acc.process_index
        metrics = {"reward_mean": float(all_raw.mean()), "reward_std": float(all_raw.std(unbiased=False)),
                   "advantage_abs_mean": float(adv.abs().mean())}
        if cfg.win_rate:
            metrics["win_rate_std"] = float(rewards.std(unbiased=False))
        return Rollout(traj, texts, tensors={"advantages": adv[p * n:(p + 1) * n].to(traj.latents.device)},
                       metrics=metrics)

    def advantages(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Advantages ``[N]`` of the epoch's gathered rewards ``[N]`` (``config.advantage``)."""
        cfg = self.config
        if cfg.advantage == "prompt_buffer":
            return self.tracker.update(prompts, rewards)
        if cfg.advantage == "batch":
            return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + cfg.adv_eps)
        return group_advantages(rewards, cfg.images_per_prompt, global_std=cfg.advantage == "group_global_std",
                                eps=cfg.adv_eps)

    # ---- loss
    def loss(self, rollout: Rollout, micro: Micro) -> StepOutput:
        cfg = self.config
        traj = rollout.traj[micro.units]
        rows = torch.arange(len(traj))
        new = transition_log_probs(self.backbone, traj, micro.steps)                  # [b, 1]
        old = traj.log_probs[rows, micro.steps.to(traj.log_probs.device)]             # [b]
        adv = rollout.tensors["advantages"][micro.units]
        losses, ratio = ppo_clip_loss(new.log_prob[:, 0], old, adv, cfg.clip_range, cfg.adv_clip_max)
        loss = losses.mean()
        metrics = ppo_metrics(loss, ratio, new.log_prob[:, 0] - old, cfg.clip_range)
        return StepOutput(self.with_reference_kl(loss, metrics, traj, micro, new), metrics)

    def with_reference_kl(self, loss: torch.Tensor, metrics: dict, traj, micro: Micro, new) -> torch.Tensor:
        """``loss + β_KL · KL(π_θ ‖ π_ref)`` of the micro-batch's transitions (``new``: the policy's, from
        :func:`transition_log_probs`), logging ``kl``; ``loss`` as it is when ``kl_beta`` is 0."""
        cfg = self.config
        if cfg.kl_beta <= 0:
            return loss
        with torch.no_grad(), self.backbone.reference():
            ref = transition_log_probs(self.backbone, traj, micro.steps)
        kl = gaussian_kl(new.mean, ref.mean, new.std, reduction=cfg.reduction).mean()
        metrics["kl"] = kl.detach()
        return loss + cfg.kl_beta * kl

    # ---- state
    def save_state(self, folder: Path) -> None:
        import json

        (folder / "stat_tracker.json").write_text(json.dumps(self.tracker.state()))

    def load_state(self, folder: Path) -> None:
        import json

        path = folder / "stat_tracker.json"
        if path.is_file():
            self.tracker.load(json.loads(path.read_text()))


def ppo_metrics(loss: torch.Tensor, ratio: torch.Tensor, log_ratio: torch.Tensor, clip_range: float) -> dict:
    """What every PPO-style update logs: ``policy_loss``, the ratio's mean and largest deviation from 1 (exactly
    0 on-policy), ``clipfrac`` and ``approx_kl = ½·mean(log ρ²)``; ``ratio``, ``log_ratio`` ``[b]``."""
    ratio, log_ratio = ratio.detach(), log_ratio.detach()
    return {"policy_loss": loss.detach(), "ratio_mean": ratio.mean(), "ratio_max_dev": (ratio - 1).abs().max(),
            "clipfrac": ((ratio - 1).abs() > clip_range).float().mean(), "approx_kl": 0.5 * (log_ratio**2).mean()}


def raw_to_rewards(raw: torch.Tensor, group_size: int, cfg: DDPOConfig) -> torch.Tensor:
    """The rewards the advantages are taken of: the scores, or their win rates within each group."""
    if not cfg.win_rate:
        return raw
    from diffalign.rewards.combine import win_rates

    return win_rates(raw, group_size, cfg.win_rate_temperature)


def _gather_texts(acc, texts: list[str]) -> list[str]:
    if acc.num_processes == 1:
        return list(texts)
    from accelerate.utils import gather_object

    return list(gather_object(list(texts)))


@register_method("grpo", GRPOConfig, kind="online")
class GRPO(DDPO):
    """DDPO with group-relative advantages (:class:`GRPOConfig`)."""


@register_method("flow-grpo", FlowGRPOConfig, kind="online")
class FlowGRPO(DDPO):
    """Flow-GRPO on flow models' SDE sampler (:class:`FlowGRPOConfig`)."""


@register_method("pref-grpo", PrefGRPOConfig, kind="online")
class PrefGRPO(DDPO):
    """Pref-GRPO: group win rates as rewards (:class:`PrefGRPOConfig`)."""
