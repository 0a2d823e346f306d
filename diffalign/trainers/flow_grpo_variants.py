"""The on-line flow-SDE GRPO variants, on Flow-GRPO's rollout and PPO update (:mod:`diffalign.trainers.ddpo`):

* ``flow-grpo-fast`` (Flow-GRPO-Fast v2, ``yifan123/flow_grpo: scripts/train_sd3_fast.py``): the rollout
  is the Euler ODE except on a window of ``w`` consecutive steps, where the SDE (CPS by default) runs;
  only the window's transitions carry log-probs and are trained. The window is drawn per rollout::

      start ~ U{lo, …, hi − w}  (inclusive),   window = [start, start + w)      (w = 0: [0, T − 1))

* ``mixgrpo`` (MixGRPO, ``Tencent-Hunyuan/MixGRPO: fastvideo/utils/grpo_states.py``): the same
  ODE/SDE mix with a window that slides from noisy to clean steps over training. After ``n`` rollouts
  (iterations)::

      cur(n) = (⌊n / K⌋ · Δ) mod P,   window = [cur, min(cur + W, T − 2))

  ``K`` iterations per position (``shift_interval``), ``Δ`` steps per shift (``shift_step``, the code's
  ``prog_overlap_step``), and with ``roll_back`` the start returns to 0 once the window would be empty
  (``P`` = the first multiple of Δ at or beyond ``T − 2``).

* ``grpo-guard`` (GRPO-Guard, arXiv 2510.22319; ``zhtmike/flow_grpo@9745241:
  scripts/train_sd3_GRPO_Guard.py``): Flow-GRPO with RatioNorm and per-step gradient reweighting
  (:mod:`diffalign.objectives.flow_grpo`)::

      log ρ̃ = (log π_θ − log π_old + R[(μ_θ − μ_old)²] / (2s²)) · s,   L = max(−A ρ̃, −A clip(ρ̃, 1±ε)) / |dt|

Everything else (rewards, group advantages, PPO clip, KL to the LoRA-off reference, ratio exactly 1
before the first update) is Flow-GRPO's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffalign.core.positions import stable_seed
from diffalign.core.sampling import FlowSDESampler, transition_log_probs
from diffalign.objectives.flow_grpo import grpo_guard_loss
from diffalign.trainers.ddpo import DDPO, FlowGRPOConfig, ppo_metrics
from diffalign.trainers.method import StepOutput, register_method
from diffalign.trainers.online import Micro, Rollout, trainable_steps, trajectory_plan


# ---------------------------------------------------------------------------------------- windows
def fast_window(num_steps: int, window_size: int, window_range: tuple[int, int] | list[int],
                generator: torch.Generator) -> tuple[int, int]:
    """Flow-GRPO-Fast's SDE window ``(start, end)``: ``start`` uniform in ``{lo, …, hi − w}`` (both ends
    included, Python's ``random.randint``), ``end = start + w``; ``w = 0`` gives ``[0, T − 1)`` (the
    last, sharpest step is never trained)."""
    if window_size == 0:
        return 0, num_steps - 1
    lo, hi = int(window_range[0]), int(window_range[1])
    if not 0 <= lo <= hi - window_size or hi > num_steps:
        raise ValueError(f"window_range {[lo, hi]} must hold a window of {window_size} steps within "
                         f"[0, {num_steps}]")
    start = lo + int(torch.randint(hi - window_size - lo + 1, (1,), generator=generator))
    return start, start + window_size


def mixgrpo_window(iteration: int, num_steps: int, window_size: int = 4, shift_interval: int = 25,
                   shift_step: int = 1, roll_back: bool = True) -> tuple[int, int]:
    """MixGRPO's progressive window ``(start, end)`` at rollout ``iteration`` (0-based), module docstring.

    The start moves by ``shift_step`` every ``shift_interval`` iterations; the window ends at most at
    ``T − 2`` (``max_timesteps``: the last two steps are never trained). Once the start reaches
    ``T − 2`` (an empty window) it returns to 0 with ``roll_back``, or stays at its last non-empty
    position without. ``shift_step = 0`` freezes the window (MixGRPO-Flash*)."""
    max_t = num_steps - 2
    if max_t < 1:
        raise ValueError(f"MixGRPO needs num_steps >= 3 (windows end before step T - 2), got {num_steps}")
    if window_size < 1 or shift_interval < 1 or shift_step < 0:
        raise ValueError("window_size and shift_interval must be >= 1, shift_step >= 0")
    shifts = iteration // shift_interval
    if shift_step == 0:
        start = 0
    else:
        positions = -(-max_t // shift_step)  # starts 0, Δ, 2Δ, … below max_t
        start = (shifts % positions if roll_back else min(shifts, positions - 1)) * shift_step
    return start, min(start + window_size, max_t)


# ---------------------------------------------------------------------------------------- configs
@dataclass
class FlowGRPOFastConfig(FlowGRPOConfig):
    """Flow-GRPO-Fast (v2, SDE window; ``config/grpo.py@31c71b9: pickscore_sd3_fast_nocfg`` /
    ``geneval_sd3_fast_nocfg``): SD3.5-M, 10 steps, no CFG in rollout or training (guidance 1), CPS with
    noise level 0.8, a window of 3 steps inside ``[0, 5)``, every window step trained, clip 1e-5,
    no KL, groups of 24 (× 48 prompts), group mean with the epoch's std.

    Attributes:
        window_size: ``w``, SDE steps per rollout (``sde_window_size`` 3); 0: steps ``[0, T − 1)``.
        window_range: ``[lo, hi)`` the window lies in (``sde_window_range`` ``(0, T//2)`` = ``[0, 5)``).
    """

    eta: float | None = 0.8
    sde_type: str = "cps"
    guidance_scale: float = 1.0
    clip_range: float = 1e-5
    kl_beta: float = 0.0
    timestep_fraction: float = 1.0
    window_size: int = 3
    window_range: list[int] = field(default_factory=lambda: [0, 5])

    def __post_init__(self):
        super().__post_init__()
        if self.window_size < 0:
            raise ValueError(f"method.window_size must be >= 0, got {self.window_size}")
        if len(self.window_range) != 2:
            raise ValueError(f"method.window_range must be [lo, hi], got {self.window_range}")
        lo, hi = self.window_range
        if self.window_size and not (0 <= lo <= hi - self.window_size and hi <= self.num_steps):
            raise ValueError(f"method.window_range {self.window_range} must hold window_size {self.window_size} "
                             f"steps within [0, num_steps = {self.num_steps}]")


@dataclass
class MixGRPOConfig(FlowGRPOConfig):
    """MixGRPO (``scripts/finetune/finetune_flux_grpo_MixGRPO.sh``, ``fastvideo/train_grpo_flux.py``):
    25 steps, Flow-GRPO SDE with noise level 0.7 inside a 4-step window that moves one step every 25
    iterations and rolls back, ODE elsewhere; groups of 12 from one initial noise, per-group std, clip
    1e-4, advantages clipped to ±5, no KL (``kl_coeff 0``), no true CFG (FLUX's guidance embedding).

    Attributes:
        window_size: ``W`` (``group_size`` 4).
        shift_interval: ``K``, rollouts per window position (``iters_per_group`` 25; Flash 20).
        shift_step: steps the window moves (``prog_overlap_step`` 1; Flash* 0: frozen at 0–3).
        roll_back: return to step 0 after the last position (``roll_back`` on).
    """

    num_steps: int = 25
    eta: float | None = 0.7
    guidance_scale: float = 1.0
    images_per_prompt: int = 12
    advantage: str = "group"
    adv_eps: float = 1e-8
    kl_beta: float = 0.0
    timestep_fraction: float = 1.0
    same_initial_noise: bool = True
    window_size: int = 4
    shift_interval: int = 25
    shift_step: int = 1
    roll_back: bool = True

    def __post_init__(self):
        super().__post_init__()
        mixgrpo_window(0, self.num_steps, self.window_size, self.shift_interval, self.shift_step, self.roll_back)


@dataclass
class GRPOGuardConfig(FlowGRPOConfig):
    """GRPO-Guard (``config/grpo_guard.py``, SD3.5-M): Flow-GRPO's SDE (noise level 0.7, 10 steps, CFG 4.5,
    groups of 24 × 48, ``timestep_fraction`` 0.99) with RatioNorm and the ``1/|dt|`` reweighting; clip
    2e-6 (GenEval, OCR; 4e-6 PickScore), per-group std (``global_std=False``), no KL; lr 1e-4 (recipe).

    Attributes:
        ratio_norm: RatioNorm's ratio ``exp((Δlog π + R[Δμ²]/(2s²))·s)`` (False: Flow-GRPO's ratio).
        grad_reweight: divide each transition's loss by ``|dt|``.
    """

    clip_range: float = 2e-6
    kl_beta: float = 0.0
    advantage: str = "group"
    ratio_norm: bool = True
    grad_reweight: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.sde_type != "sde":
            raise ValueError("grpo-guard's RatioNorm and reweighting are defined for the Flow-GRPO SDE "
                             f"(method.sde_type: sde), not {self.sde_type!r}")


# ---------------------------------------------------------------------------------------- methods
def _require_flow(method) -> FlowSDESampler:
    if not isinstance(method.sampler, FlowSDESampler):
        raise ValueError(f"{method.name} needs a flow-matching model (SD3/SD3.5) and its SDE sampler, "
                         f"not the {method.sampler.kind} sampler of this backbone")
    return method.sampler


class _WindowedFlowGRPO(DDPO):
    """Flow-GRPO on rollouts whose SDE runs only on a window of steps (:meth:`window`); ODE elsewhere."""

    def __init__(self, config, backbone):
        super().__init__(config, backbone)
        self.full_sampler = _require_flow(self)

    def window(self, run, epoch: int) -> tuple[int, int]:
        raise NotImplementedError

    def rollout(self, run, epoch: int) -> Rollout:
        start, end = self.window(run, epoch)
        self.sampler = self.full_sampler.with_window((start, end))   # the rollout's trajectories keep it
        rollout = super().rollout(run, epoch)
        rollout.metrics.update({"sde_window_start": float(start), "sde_window_end": float(end)})
        return rollout

    def plan(self, rollout: Rollout, run, generator: torch.Generator) -> list[list[Micro]]:
        """Flow-GRPO's plan over the window's steps only (the rollout's sampler's stochastic steps)."""
        cfg = run.recipe.train
        return trajectory_plan(self.num_units(rollout), cfg.batch_size, cfg.gradient_accumulation_steps,
                               trainable_steps(rollout.traj.sampler), self.config.timestep_fraction, generator)


@register_method("flow-grpo-fast", FlowGRPOFastConfig, kind="online")
class FlowGRPOFast(_WindowedFlowGRPO):
    """Flow-GRPO-Fast: a random SDE window per rollout (:class:`FlowGRPOFastConfig`)."""

    def window(self, run, epoch: int) -> tuple[int, int]:
        """Drawn from ``(train.seed, epoch)``: the same on every process, and again on resume."""
        cfg = self.config
        g = torch.Generator().manual_seed(stable_seed(run.recipe.train.seed, "sde-window", epoch))
        return fast_window(cfg.num_steps, cfg.window_size, cfg.window_range, g)


@register_method("mixgrpo", MixGRPOConfig, kind="online")
class MixGRPO(_WindowedFlowGRPO):
    """MixGRPO: the SDE window slides over the rollouts (:class:`MixGRPOConfig`)."""

    def window(self, run, epoch: int) -> tuple[int, int]:
        cfg = self.config
        return mixgrpo_window(epoch, cfg.num_steps, cfg.window_size, cfg.shift_interval, cfg.shift_step,
                              cfg.roll_back)


@register_method("grpo-guard", GRPOGuardConfig, kind="online")
class GRPOGuard(DDPO):
    """Flow-GRPO with GRPO-Guard's RatioNorm and gradient reweighting (:class:`GRPOGuardConfig`)."""

    records_means = True  # μ_old of every transition, stored at rollout

    def __init__(self, config: GRPOGuardConfig, backbone):
        super().__init__(config, backbone)
        _require_flow(self)

    def loss(self, rollout: Rollout, micro: Micro) -> StepOutput:
        cfg = self.config
        traj = rollout.traj[micro.units]
        rows = torch.arange(len(traj))
        steps = micro.steps.to(traj.log_probs.device)
        new = transition_log_probs(self.backbone, traj, micro.steps)                   # [b, 1]
        old = traj.log_probs[rows, steps]                                              # [b]
        old_mean = traj.means[rows, steps]                                             # [b, C, h, w]
        dt = traj.sampler.dt.to(steps.device)[steps]                                   # [b]
        adv = rollout.tensors["advantages"][micro.units]
        losses, ratio = grpo_guard_loss(new.log_prob[:, 0], old, new.mean[:, 0], old_mean, new.std[:, 0], dt, adv,
                                        cfg.clip_range, cfg.adv_clip_max, ratio_norm=cfg.ratio_norm,
                                        reweight=cfg.grad_reweight, reduction=cfg.reduction)
        loss = losses.mean()
        delta = (new.log_prob[:, 0] - old).detach()
        metrics = ppo_metrics(loss, ratio, delta, cfg.clip_range)
        metrics["raw_ratio_mean"] = delta.exp().mean()  # Flow-GRPO's ratio, for comparison
        return StepOutput(self.with_reference_kl(loss, metrics, traj, micro, new), metrics)
