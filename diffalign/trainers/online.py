"""The on-line step source shared by DDPO/GRPO, D3PO and SePPO: sample with the policy, score, optimise,
on the one training loop (:func:`diffalign.trainers.loop.train`; this module gives it
:func:`rollout_steps`).

Read top to bottom (``rollout_steps``)::

    setup(recipe)                        backbone + LoRA, method, optimizer (the offline loop's helpers)
    for epoch = 0, 1, ...:
        rollout = method.rollout(run, epoch)            no grad: trajectories with per-step
                                                        log-probs, rewards / labels, advantages
        for inner epoch:
            for step in method.plan(rollout, ...):      shuffled trajectories, shuffled steps
                for micro-batch in step:                stored log-probs reused as the old policy
                    loss = method.loss(rollout, micro); backward
                clip, optimizer step, one metrics.jsonl row
        method.end_epoch(run, epoch)
        checkpoints/step-N at an epoch end when a multiple of train.checkpointing_steps was passed
    final/                               the LoRA in diffusers format

Sizes (per process): an epoch samples ``prompts_per_epoch`` prompts (``images_per_prompt`` images
each) in sampler calls of ``sample_batch_size`` trajectories; a micro-batch is ``train.batch_size``
units (trajectories for DDPO/GRPO, pairs for D3PO/SePPO) at one denoising step each, and an optimizer
step accumulates ``train.gradient_accumulation_steps`` micro-batches × the trained steps
(ddpo-pytorch's accumulation). Keep ``sample_batch_size`` equal to ``train.batch_size`` (the
default): the denoiser then sees batches of the rollout's size and the recomputed log-prob of a
stored transition equals the stored one bit for bit, so the PPO / D3PO ratio is exactly 1 before
the first update (:mod:`diffalign.core.sampling`, "Numerics").

Determinism: the prompts, the noise and the shuffles of an epoch are functions of
``(train.seed, epoch, process)`` only, and checkpoints are written at epoch ends, so ``--resume
latest`` continues a stopped run to the same weights as an unbroken one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffalign.core.positions import stable_seed
from diffalign.core.sampling import (
    SDE_TYPES,
    Sampler,
    Trajectory,
    initial_latents,
    make_sampler,
    sample_trajectory,
)
from diffalign.trainers.loop import Run
from diffalign.trainers.method import StepOutput


class StopForInput(RuntimeError):
    """Raised by a rollout that needs something from the user first (D3PO's human labels): the run
    stops cleanly with this message and no ``final/``."""


# ---------------------------------------------------------------------------------------- config
@dataclass
class RolloutConfig:
    """Sampling knobs every on-line method shares (its config dataclass extends this one).

    Attributes:
        prompts: where training prompts come from: a prompt-set name of
            :func:`diffalign.eval.prompts.load_prompt_set` (``shapes``, ``ddpo-simple-animals``,
            ``partiprompts``, ...), a ``.txt``/``.jsonl`` prompt file, or a list of prompts.
        prompt_options: keyword arguments of the prompt set (``shapes``: ``split`` (default
            ``train``: never the held-out split), ``n_per_task``, ``seed``).
        prompts_per_epoch: prompts drawn (uniformly, with replacement, as ddpo-pytorch's
            ``prompt_fn``) per epoch and process.
        num_steps: sampler steps ``T`` of a rollout.
        eta: DDIM η (DDPM-type models) or the flow SDE's noise level ``a`` (SD3); ``None`` takes
            the sampler's default (1.0 / 0.7, ddpo-pytorch / Flow-GRPO).
        guidance_scale: classifier-free guidance weight, used in the rollout and in training.
        resolution: image side in pixels; ``None`` = the pipeline's default.
        sample_batch_size: trajectories per sampler call (pairs for D3PO); ``None`` =
            ``train.batch_size`` (needed for an exact ratio of 1, see the module docstring).
        timestep_fraction: share of each trajectory's stochastic steps trained per inner epoch
            (a random subset per trajectory; ddpo-pytorch's ``timestep_fraction``).
        num_inner_epochs: passes over one rollout before sampling again.
        reduction: ``mean`` (the originals; clip ranges of 1e-4 assume it) or ``sum`` over latent
            dims in the per-step log-prob.
        sde_type: flow models' SDE: ``sde`` (Flow-GRPO's, the default) or ``cps`` (coefficient-preserving
            sampling, :class:`~diffalign.core.sampling.FlowSDESampler`); DDIM models accept only ``sde``.
    """

    prompts: str | list[str] = "shapes"
    prompt_options: dict[str, Any] = field(default_factory=dict)
    prompts_per_epoch: int = 8
    num_steps: int = 20
    eta: float | None = None
    guidance_scale: float = 5.0
    resolution: int | None = None
    sample_batch_size: int | None = None
    timestep_fraction: float = 1.0
    num_inner_epochs: int = 1
    reduction: str = "mean"
    sde_type: str = "sde"

    def __post_init__(self):
        if self.sde_type not in SDE_TYPES:
            raise ValueError(f"method.sde_type must be one of {', '.join(SDE_TYPES)}, not {self.sde_type!r}")


def load_prompts(spec: str | Sequence[str], options: dict[str, Any] | None = None) -> list[str]:
    """The training prompts of ``spec``: a list of prompts, a prompt-set name of
    :func:`diffalign.eval.prompts.load_prompt_set` (``shapes`` defaults to its ``train`` split: never
    the held-out combinations unless asked), ``NAME:PATH`` or a ``.txt``/``.jsonl`` prompt file."""
    if not isinstance(spec, str):
        prompts = [str(p) for p in spec]
    else:
        from diffalign.eval.prompts import load_prompt_set, prompts_fields

        where, options = prompts_fields(spec), dict(options or {})
        if where["name"] == "shapes":
            options.setdefault("split", "train")
        prompts = [item.text for item in load_prompt_set(where["name"], path=where["path"], **options)]
    if not prompts:
        raise ValueError(f"method.prompts {spec!r}: no prompts")
    return prompts


def build_reward(spec: str | dict[str, float], options: dict[str, dict] | None = None,
                 normalize: str | None = "batch"):
    """A reward model from a name (``"shapes-clip"``) or a weighted mix (``{"pickscore": 1.0,
    "hpsv2.1": 0.5}``, each reward normalised within the scored batch, :class:`WeightedReward`).
    ``options`` maps reward names to their loading keyword arguments."""
    from diffalign.rewards import WeightedReward, load_reward

    options = options or {}
    if not spec:
        raise ValueError("the method needs a reward: a registered name (diffalign score --list) or "
                         "{name: weight, ...}")
    if isinstance(spec, str):
        return load_reward(spec, **options.get(spec, {}))
    models = [load_reward(name, **options.get(name, {})) for name in spec]
    return WeightedReward(models, weights={m.name: float(w) for m, w in zip(models, spec.values())},
                          normalize=normalize)


# ---------------------------------------------------------------------------------------- methods
@dataclass
class Micro:
    """One micro-batch: ``units`` ``[b]`` indices into the rollout's units (trajectories or pairs)
    and ``steps`` ``[b]`` the denoising step trained for each (None for step-free methods)."""

    units: torch.Tensor
    steps: torch.Tensor | None = None


@dataclass
class Rollout:
    """What one epoch's sampling produced.

    Attributes:
        traj: the trajectories (``latents [N, T+1, C, h, w]``, ``log_probs [N, T]``), or None.
        prompts: ``[N]`` the prompt of each trajectory.
        tensors: the method's per-unit tensors (advantages, labels, cached reference log-probs, ...).
        metrics: rollout statistics logged with every optimizer step of the epoch (same on every
            process: computed from gathered values).
        extra: anything else the method keeps for its loss.
    """

    traj: Trajectory | None
    prompts: list[str]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class OnlineMethod:
    """Base class of the on-line methods: ``rollout`` (no grad), ``plan`` and ``loss``.

    Subclasses register with ``@register_method(name, config, kind="online")`` (a
    :class:`RolloutConfig` subclass) and implement :meth:`rollout` and :meth:`loss`; :meth:`plan`
    defaults to shuffled units × shuffled stochastic steps (:func:`trajectory_plan`). The one training
    loop (:func:`diffalign.trainers.loop.train`) runs them through :meth:`steps`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type]
    kind: ClassVar[str]  # set by register_method
    units_per_sample: ClassVar[int] = 1  # trajectories per unit (2 for D3PO's pairs)
    records_means: ClassVar[bool] = False  # rollouts keep every transition mean (GRPO-Guard's μ_old)
    trains_on_steps: ClassVar[bool] = True  # needs stochastic sampler steps (SePPO does not)

    def __init__(self, config: RolloutConfig, backbone):
        if not 0 < config.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction must be in (0, 1], got {config.timestep_fraction}")
        if config.num_inner_epochs < 1:
            raise ValueError(f"num_inner_epochs must be >= 1, got {config.num_inner_epochs}")
        self.config = config
        self.backbone = backbone
        self.sampler: Sampler = make_sampler(backbone, config.num_steps, eta=config.eta,
                                             reduction=config.reduction, resolution=config.resolution,
                                             sde_type=config.sde_type)
        if self.trains_on_steps:
            trainable_steps(self.sampler)  # fail now, not after the first rollout

    # ---- the engine's hooks (diffalign.trainers.loop.setup / train)
    def training_data(self, run: Run) -> None:
        """No stored batch source: the method samples its own (its prompts are in its config)."""
        return None

    def steps(self, run: Run) -> Iterator[tuple[dict | None, bool]]:
        """The run's step source: :func:`rollout_steps`."""
        return rollout_steps(run)

    # ---- per epoch
    def rollout(self, run: Run, epoch: int) -> Rollout:
        raise NotImplementedError

    def num_units(self, rollout: Rollout) -> int:
        return len(rollout.traj) // self.units_per_sample

    def plan(self, rollout: Rollout, run: Run, generator: torch.Generator) -> list[list[Micro]]:
        """The optimizer steps of one inner epoch, each a list of micro-batches."""
        cfg = run.recipe.train
        return trajectory_plan(self.num_units(rollout), cfg.batch_size, cfg.gradient_accumulation_steps,
                               trainable_steps(self.sampler), self.config.timestep_fraction, generator)

    def loss(self, rollout: Rollout, micro: Micro) -> StepOutput:
        raise NotImplementedError

    def prepare(self, run: Run) -> None:
        """Called once the run exists (e.g. SePPO loads its winning images from the data section)."""

    def end_epoch(self, run: Run, epoch: int) -> None:
        """Called after each complete epoch (SePPO adds a checkpoint to its reference pool)."""

    def after_step(self, run: Run) -> None:
        """Called after each optimizer step (``run.global_step`` already counts it; DGPO's EMA reference)."""

    # ---- resumable state beyond the weights and the optimizer
    def save_state(self, folder: Path) -> None:
        """Write the method's own state into a checkpoint folder (main process)."""

    def load_state(self, folder: Path) -> None:
        """Read what :meth:`save_state` wrote."""

    # ---- helpers for subclasses
    def epoch_prompts(self, run: Run, epoch: int, all_prompts: Sequence[str]) -> list[str]:
        """This process's ``prompts_per_epoch`` prompts of ``epoch`` (drawn for all processes from
        one generator, so the run is the same on any number of processes with the same total)."""
        acc, n = run.accelerator, self.config.prompts_per_epoch
        g = torch.Generator().manual_seed(stable_seed(run.recipe.train.seed, "prompts", epoch))
        idx = torch.randint(len(all_prompts), (n * acc.num_processes,), generator=g)
        return [all_prompts[i] for i in idx[acc.process_index * n:(acc.process_index + 1) * n].tolist()]

    def sample(self, run: Run, texts: Sequence[str], epoch: int, *, shared_noise: int = 1,
               on_call: Callable[[Trajectory, list[str]], None] | None = None) -> Trajectory:
        """Trajectories for ``texts`` (no grad), ``sample_batch_size`` per sampler call;
        ``shared_noise`` consecutive trajectories start from the same initial noise. ``on_call(part,
        texts)`` runs after each sampler call (e.g. to start scoring it)."""
        cfg, backbone = self.config, self.backbone
        acc = run.accelerator
        per_call = (cfg.sample_batch_size or run.recipe.train.batch_size) * self.units_per_sample
        g = torch.Generator(backbone.device).manual_seed(
            stable_seed(run.recipe.train.seed, "rollout", epoch, acc.process_index))
        if len(texts) % shared_noise:
            raise ValueError(f"{len(texts)} trajectories do not split into groups of {shared_noise}")
        size = cfg.resolution
        x0 = initial_latents(backbone, self.sampler, len(texts) // shared_noise, generator=g, height=size,
                             width=size).repeat_interleave(shared_noise, dim=0)
        parts = []
        with torch.no_grad():
            # every call's prompts at the rollout's one text length: the update recomputes a micro-batch
            # drawn across calls at that length, so the rollout must have used it too (ratio exactly 1)
            starts = range(0, len(texts), per_call)
            conds = [backbone.encode_prompt(list(texts[start:start + per_call])) for start in starts]
            if any(c.mask is not None for c in conds):
                length = max(c.prompt_embeds.shape[1] for c in conds)
                conds = [c.padded(length) for c in conds]
            for start, cond in zip(starts, conds):
                chunk = list(texts[start:start + per_call])
                parts.append(sample_trajectory(backbone, self.sampler, cond,
                                               guidance_scale=cfg.guidance_scale,
                                               latents=x0[start:start + per_call], generator=g,
                                               record_means=self.records_means))
                if on_call is not None:
                    on_call(parts[-1], chunk)
        return Trajectory.cat(parts)

    def sample_and_score(self, run: Run, texts: Sequence[str], epoch: int, reward, *, shared_noise: int = 1,
                         overlap: bool = False) -> tuple[Trajectory, torch.Tensor]:
        """Trajectories for ``texts`` (:meth:`sample`) and ``reward``'s scores ``[N]`` (CPU fp32) of their
        decoded final images: all decoded and scored after sampling, or (``overlap``) each sampler call's
        images decoded at once and handed to ``reward.score_async`` while the next call samples (a served
        reward answers from a worker thread; an in-process one scores on the spot), all awaited at the end."""
        if not overlap:
            traj = self.sample(run, texts, epoch, shared_noise=shared_noise)
            return traj, reward.score(self.backbone.decode_latents(traj.final), list(texts)).float().cpu()
        futures = []
        traj = self.sample(run, texts, epoch, shared_noise=shared_noise, on_call=lambda part, chunk: futures.append(
            reward.score_async(self.backbone.decode_latents(part.final), chunk)))
        return traj, torch.cat([f.result().float().cpu() for f in futures])


def trainable_steps(sampler: Sampler) -> torch.Tensor:
    """``[S]`` indices of the sampler's stochastic steps (``std > 0``); deterministic steps carry
    no policy gradient and are never trained."""
    steps = torch.nonzero(sampler.stds > 0).flatten()
    if steps.numel() == 0:
        raise ValueError(f"every step of the {sampler.kind} sampler is deterministic (eta = {sampler.eta}); "
                         "on-line methods need eta > 0")
    return steps


def trajectory_plan(num_units: int, batch_size: int, grad_accum: int, steps: torch.Tensor | None,
                    fraction: float, generator: torch.Generator) -> list[list[Micro]]:
    """ddpo-pytorch's inner epoch: shuffle the units, give each its own random order of the
    stochastic ``steps`` and keep the first ``K = max(1, int(S·fraction))``; a minibatch of
    ``batch_size`` units makes ``K`` micro-batches (step k of each unit's order), and
    ``grad_accum`` minibatches make one optimizer step (a shorter last one if they do not divide).
    ``steps=None``: one micro-batch per minibatch, no step."""
    order = torch.randperm(num_units, generator=generator)
    if steps is None:
        perms, k = None, 1
    else:
        k = max(1, int(len(steps) * fraction))
        perms = torch.stack([steps[torch.randperm(len(steps), generator=generator)[:k]]
                             for _ in range(num_units)]) if num_units else torch.zeros(0, k, dtype=torch.long)
    minibatches = list(order.split(batch_size))
    plan = []
    for start in range(0, len(minibatches), grad_accum):
        micros = []
        for mb in minibatches[start:start + grad_accum]:
            micros += [Micro(mb, None if perms is None else perms[mb, j]) for j in range(k)]
        plan.append(micros)
    return plan


# ---------------------------------------------------------------------------------------- the steps
def rollout_steps(run: Run) -> Iterator[tuple[dict | None, bool]]:
    """The on-line step source: per epoch, a rollout with the current policy, then the method's inner
    epochs of optimizer steps on it (each yields its metrics row), then ``end_epoch``; a checkpoint may
    follow an epoch's end only (the boundary event, no row). Stops at ``max_steps`` inside an epoch (no
    ``end_epoch`` then), or when the method needs outside input (``run.stopped``)."""
    cfg = run.recipe.train
    while run.global_step < cfg.max_steps:
        if run.progress is not None:
            run.progress.set_description(f"epoch {run.epoch}: sample")
        try:
            rollout = run_rollout(run)
        except StopForInput as e:
            run.stopped = str(e)
            return
        if run.progress is not None:
            run.progress.set_description(f"epoch {run.epoch}: train")
        for inner, plan in enumerate(epoch_plans(run, rollout)):
            for micros in plan:
                if run.global_step >= cfg.max_steps:
                    return  # max_steps reached inside the epoch: no end-of-epoch state, no checkpoint
                row = online_step(run, rollout, micros)
                run.method.after_step(run)
                row.update({"epoch": run.epoch, "inner_epoch": inner, **rollout.metrics})
                yield row, False
        run.method.end_epoch(run, run.epoch)
        run.epoch += 1
        yield None, True


def run_rollout(run: Run) -> Rollout:
    """The method's rollout for ``run.epoch``, without gradients."""
    t0 = time.perf_counter()
    with torch.no_grad():
        rollout = run.method.rollout(run, run.epoch)
    rollout.metrics["rollout_seconds"] = time.perf_counter() - t0
    return rollout


def epoch_plans(run: Run, rollout: Rollout) -> list[list[list[Micro]]]:
    """The method's plan for each inner epoch (shuffles seeded by seed, epoch, inner epoch, process)."""
    cfg, acc = run.recipe.train, run.accelerator
    plans = []
    for inner in range(run.method.config.num_inner_epochs):
        g = torch.Generator().manual_seed(stable_seed(cfg.seed, "plan", run.epoch, inner, acc.process_index))
        plans.append(run.method.plan(rollout, run, g))
    return plans


def online_step(run: Run, rollout: Rollout, micros: Sequence[Micro]) -> dict:
    """One optimizer step over ``micros`` (the offline loop's accumulate / clip / step); its row."""
    from diffalign.trainers.loop import optimizer_step

    return optimizer_step(run, [lambda m=m: run.method.loss(rollout, m) for m in micros])


def gather_float(acc, values: torch.Tensor) -> torch.Tensor:
    """All processes' ``values`` ``[n]`` concatenated in process order (CPU fp32)."""
    return acc.gather(values.float().to(acc.device).contiguous()).cpu()
