"""Reward backpropagation on the shared loop: AlignProp, DRaFT-K, DRaFT-LV, ReFL.

Each optimizer step samples fresh images *with gradients* from the current model and descends on
a differentiable reward (``RewardModel.score`` in ``mode="differentiable"``)::

    prompts ─encode─▶ sampler with gradients (core/backprop) ─VAE─▶ images [0,1] ─reward─▶ r
    loss = scale · (−r)                           AlignProp, DRaFT-K, DRaFT-LV
    loss = scale · relu(margin − r) + λ · L_pre   ReFL (L_pre: denoising loss on a data batch)

The methods differ only in where gradients flow (see :mod:`diffalign.core.backprop`):

- AlignProp (Prabhudesai et al. 2023): the whole chain, every denoiser call checkpointed; optional
  randomised truncation, one ``k`` per trajectory (AlignProp v2's ``sd_pipeline.py``; the v1 and
  TRL code re-drew ``k`` at every step, a quirk not reproduced).
- DRaFT-K (Clark et al. 2024): the last K steps only (K = 1 by default, the paper's best).
- DRaFT-LV: K = 1 plus ``n`` copies of the final sample re-noised to the last step's noise level,
  each denoised in one step with gradients; the reward averages over the 1 + n images.
- ReFL (ImageReward, Xu et al. 2023): no-grad sampling to a random late step ``j``, one denoiser
  call with gradients, the reward on the one-step x̂0, plus the paper's pre-training regulariser.

Everything random in a step (prompts, initial and step noise, AlignProp's ``k``, ReFL's ``j``, the
regulariser batch) is a function of ``(train.seed, run position)``, so ``--resume latest`` and a run
on more processes with less accumulation see the same samples. ``train.batch_size`` counts prompts
(one image each) per micro-batch and process.

Recipe (``diffalign train pipelines/shapes-draft.yaml``)::

    model:  {pretrained: "bundled:shapes-sd-base", lora_rank: 8}
    method: {name: draft, k: 1, reward: shapes-clip, prompts: shapes, prompt_options: {split: train}}
    train:  {output_dir: runs/shapes-draft, max_steps: 100, batch_size: 4, learning_rate: 1.0e-3}
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffalign.core.backprop import (
    predict_x0,
    refl_step_range,
    refl_x0,
    sample_with_grad,
)
from diffalign.core.positions import (
    EpochOrder,
    micro_batch_positions,
    position_generator,
    stable_seed,
)
from diffalign.core.sampling import make_sampler, uses_cfg
from diffalign.models.base import Conditioning
from diffalign.trainers.config import Recipe
from diffalign.trainers.method import Method, StepOutput, register_method
from diffalign.trainers.online import load_prompts


# ---------------------------------------------------------------------------------------- configs
@dataclass
class RewardBackpropConfig:
    """Knobs every reward-backprop method shares.

    Attributes:
        reward: a registered reward (``"laion-aesthetic"``, ``"hpsv2.1"``, ``"pickscore"``,
            ``"shapes-clip"``, ...), a folder with a ``reward.yaml``, or ``{name: weight}`` for a
            weighted sum of raw scores. Must have a differentiable mode.
        reward_kwargs: keyword arguments of the reward's factory (``weights``, ``dtype``, ...).
        reward_sign: +1 maximises the reward; −1 minimises it (the sign-flipped control of the
            efficacy tests).
        loss_scale: the loss is ``loss_scale · (−r)`` (ReFL: ``loss_scale · relu(margin − r)``).
            With Adam only its interplay with gradient clipping and ε matters.
        prompts: the training prompts: a prompt set of :data:`diffalign.eval.prompts.PROMPT_SETS`
            (``drawbench``, ``hpdv2``, ``shapes``, ...), ``NAME:PATH`` (a local copy), or a
            ``.txt``/``.jsonl`` file of prompts.
        prompt_options: keyword arguments of the set's loader (``shapes``: ``split``, default
            ``train`` here, ``n_per_task``, ``seed``).
        num_steps: sampler steps ``T``.
        eta: DDIM η (DDPM-type models) or the flow SDE's noise level (SD3).
        guidance_scale: classifier-free guidance weight (CFG runs when > 1).
        negative_prompt: CFG negative (None: the pipeline's default negative).
        resolution: image side in pixels (None: the pipeline's default size).
        checkpoint: checkpoint every grad-carrying denoiser call (activations recomputed in backward).
    """

    reward: str | dict[str, float] = "laion-aesthetic"
    reward_kwargs: dict[str, Any] = field(default_factory=dict)
    reward_sign: float = 1.0
    loss_scale: float = 1.0
    prompts: str | list[str] = "drawbench"
    prompt_options: dict[str, Any] = field(default_factory=dict)
    num_steps: int = 50
    eta: float = 1.0
    guidance_scale: float = 5.0
    negative_prompt: str | None = None
    resolution: int | None = None
    checkpoint: bool = True

    def __post_init__(self):
        if self.reward_sign not in (1.0, -1.0):
            raise ValueError(f"reward_sign must be 1 or -1, got {self.reward_sign}")


@dataclass
class AlignPropConfig(RewardBackpropConfig):
    """AlignProp: gradients through the whole chain, every denoiser call checkpointed.

    Defaults from AlignProp v2 (``mihirp1998/AlignProp`` HEAD, TRL-based): T = 50, η = 1.0, CFG 5.0,
    ``loss_coeff`` 0.01 (their ``|r − 10|`` aesthetic loss is ``10 − r`` while r < 10, i.e. ``−r``
    up to a constant). Their optimiser: AdamW lr 1e-3 on a rank-4 LoRA (set in ``train``).

    Attributes:
        truncation: ``"none"`` (the full chain, the paper's method), ``"gaussian"`` (v2's default:
            gradients stop before step ``k ~ N(mean·T, std·T)`` redrawn until ``1 ≤ k < T``, one ``k``
            per trajectory: about the last 8 of 50 steps carry gradients) or ``"uniform"``
            (``k ~ U{0, …, T−1}``, v1's range).
        truncation_mean, truncation_std: the Gaussian's mean and std as fractions of ``T``
            (N(42, 5) of 50 in v2).
    """

    num_steps: int = 50
    eta: float = 1.0
    guidance_scale: float = 5.0
    loss_scale: float = 0.01
    truncation: str = "none"
    truncation_mean: float = 0.84
    truncation_std: float = 0.1


@dataclass
class DRaFTConfig(RewardBackpropConfig):
    """DRaFT-K: gradients through the last ``k`` sampler steps only.

    Defaults from the DRaFT paper (Clark et al., ICLR 2024; no official code; values as quoted by a
    community implementation, unverified): DDIM with 50 steps, CFG 7.5, loss ``−r``, LoRA rank 8,
    AdamW lr 4e-4 (``train``). K = 1 is the paper's most efficient setting.

    Attributes:
        k: the number of final steps that carry gradients; None = the full chain (plain DRaFT).
    """

    num_steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 7.5
    k: int | None = 1


@dataclass
class DRaFTLVConfig(RewardBackpropConfig):
    """DRaFT-LV: DRaFT-1 plus ``n`` re-noised copies of the final sample.

    The final sample ``x̂0`` (no gradient into it) is noised to the last step's level with fresh
    noise, ``x_n = √ᾱ_t x̂0 + √(1−ᾱ_t) ε_n`` (flow: ``(1−σ) x̂0 + σ ε_n``), and denoised with one
    grad-enabled call at that step; the reward averages over the DRaFT-1 image and the ``n``
    copies (as ``RuoyuWang-2077/FlowBP``'s ``draft_lv.py`` does). Sampling defaults as DRaFT-K.

    Attributes:
        n: re-noised copies per prompt (2 in the paper).
    """

    num_steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 7.5
    n: int = 2


@dataclass
class ReFLConfig(RewardBackpropConfig):
    """ReFL: one grad-enabled denoiser call at a random late step, plus a pre-training regulariser.

    Defaults from ImageReward's ``ReFL.py`` / ``train_refl.sh``: DDPM-like sampling (η = 1) with 40
    steps and no CFG, the step drawn from ``[30, 39]`` (the last quarter), loss
    ``1e-3 · relu(2 − r)``, AdamW lr 1e-5 on the full UNet for 100 steps (``train``).

    The pre-training loss of the paper (a plain denoising loss on data, added with weight
    ``pretrain_weight``) is missing from the released ``ReFL.py``; its users report outputs worse
    than the base model without it (ImageReward issues #24, #34, #88, #95). Here it is on by
    default: the two losses are summed into one optimizer step (``ReFL_SDXL.py --apply_pre_loss``
    accumulates both each step; the paper alternates two updates). ``pretrain_weight: 0`` turns it
    off, at the price of degrading outputs.

    Attributes:
        step_range: ``[lo, hi]`` (inclusive) sampler steps to draw ``j`` from; None = the last
            quarter ``[⌊0.75·T⌋, T−1]``.
        margin: ReFL's hinge ``relu(margin − r)``; None gives the plain ``−r``.
        pretrain_weight: λ of the pre-training (denoising) loss.
        pretrain_data: where its batches come from: ``"data"`` (the recipe's ``data`` section
            through the offline loaders: the chosen images of preference pairs) or ``"shapes"``
            (scenes of train-split captions drawn by the Shapes renderer, for the Shapes world).
    """

    num_steps: int = 40
    eta: float = 1.0
    guidance_scale: float = 1.0
    loss_scale: float = 1e-3
    step_range: list[int] | None = None
    margin: float | None = 2.0
    pretrain_weight: float = 1.0
    pretrain_data: str = "data"


# ---------------------------------------------------------------------------------------- data
@dataclass
class PromptBatch:
    """One micro-batch of an on-line method: ``B`` prompts and where it sits in the run.

    ``seed`` is a function of ``(train.seed, first run position)`` only: the method draws its noise
    (and any random choice) from generators seeded by it.
    """

    prompts: list[str]
    step: int
    micro: int
    process: int
    num_processes: int
    seed: int


@dataclass
class PromptData:
    """The training prompts; ``batch(step, micro, process, num_processes)`` is a pure function of the
    run position (each epoch visits the prompts in a seeded random order)."""

    prompts: list[str]
    batch_size: int
    gradient_accumulation_steps: int
    seed: int
    _order: EpochOrder | None = field(default=None, repr=False)

    def prompt_at(self, position: int) -> str:
        """The prompt at a run position (epoch ``position // len(prompts)``, seeded shuffle)."""
        if self._order is None:
            self._order = EpochOrder(len(self.prompts), self.seed, "prompt-epoch")
        return self.prompts[self._order(position)]

    def batch(self, step: int, micro: int, process: int, num_processes: int) -> PromptBatch:
        """The ``batch_size`` prompts of one micro-batch of one process."""
        positions = micro_batch_positions(step, micro, process, num_processes, self.batch_size,
                                          self.gradient_accumulation_steps)
        return PromptBatch([self.prompt_at(p) for p in positions], step, micro, process, num_processes,
                           stable_seed(self.seed, "backprop", positions[0]))


# ---------------------------------------------------------------------------------------- methods
class RewardBackprop(Method):
    """Shared part of the reward-backprop methods: reward, sampler, conditioning and the loss.

    Subclasses implement :meth:`images` (where the gradients flow) and may add terms in
    :meth:`extra_loss`. ``loss(batch: PromptBatch)`` takes prompts, not an encoded data batch.
    """

    data_kind = "prompts"
    uses_reference = False
    config_class: ClassVar[type] = RewardBackpropConfig

    def __init__(self, config: RewardBackpropConfig, backbone, reward=None):
        super().__init__(config, backbone)
        self.reward = reward if reward is not None else load_backprop_reward(config.reward, config.reward_kwargs)
        self.reward.to(backbone.device)
        self.sampler = make_sampler(backbone, config.num_steps, eta=config.eta)

    # ---- the engine's hooks (diffalign.trainers.loop.setup)
    @classmethod
    def build(cls, recipe: Recipe, backbone, accelerator):
        """The method with its reward and, for ReFL, its pre-training data (:func:`build_backprop_method`)."""
        return build_backprop_method(recipe, backbone, accelerator)

    def training_data(self, run) -> PromptData:
        """The training prompts, ``batch_size`` per micro-batch, a function of the run position."""
        cfg = run.recipe.train
        return PromptData(load_prompts(self.config.prompts, self.config.prompt_options), cfg.batch_size,
                          cfg.gradient_accumulation_steps, cfg.seed)

    # ---- pieces
    def conditioning(self, prompts: list[str]) -> tuple[Conditioning, Conditioning | None]:
        """``(cond, uncond)`` of ``B`` prompts (uncond None without CFG)."""
        cfg = self.config
        cond = self.backbone.encode_prompt(prompts)
        if not uses_cfg(cfg.guidance_scale, self.backbone):
            return cond, None
        return cond, self.backbone.negative_conditioning(len(prompts), cfg.negative_prompt)

    def generator(self, batch: PromptBatch, what: str) -> torch.Generator:
        """A CPU generator seeded by the micro-batch's seed and ``what`` (noise, draws, ...)."""
        return position_generator(batch.seed, what)

    def images(self, batch: PromptBatch) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]:
        """``(images [N, 3, H, W] in [0, 1] with gradients, the N prompts, metrics)``."""
        raise NotImplementedError

    def reward_loss(self, rewards: torch.Tensor) -> torch.Tensor:
        """Per-image loss ``[N]`` from rewards ``[N]`` (already multiplied by ``reward_sign``)."""
        return -self.config.loss_scale * rewards

    def extra_loss(self, batch: PromptBatch) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """A scalar term added to the reward loss (ReFL's regulariser) and its metrics; none here."""
        return None, {}

    def loss(self, batch: PromptBatch) -> StepOutput:
        """The scalar loss of one micro-batch: ``mean_N reward_loss(sign · r(images, prompts))`` plus
        :meth:`extra_loss`. Metrics: ``reward`` (the raw reward's mean over the ``N`` images, before
        the sign), ``reward_loss`` and the method's own."""
        images, prompts, metrics = self.images(batch)
        raw = self.reward.score(images, prompts)                              # [N]
        reward_loss = self.reward_loss(self.config.reward_sign * raw).mean()
        extra, extra_metrics = self.extra_loss(batch)
        loss = reward_loss if extra is None else reward_loss + extra
        return StepOutput(loss, {"reward": raw.detach().mean(), "reward_loss": reward_loss.detach(),
                                 **metrics, **extra_metrics})

    def _size(self) -> dict[str, int | None]:
        r = self.config.resolution
        return {"height": r, "width": r}


@register_method("alignprop", AlignPropConfig, kind="backprop")
class AlignProp(RewardBackprop):
    """AlignProp (:class:`AlignPropConfig`): the whole chain, or the last ``T − k`` steps with a
    random ``k`` drawn once per trajectory."""

    def __init__(self, config: AlignPropConfig, backbone, reward=None):
        if config.truncation not in ("none", "gaussian", "uniform"):
            raise ValueError(f"method.truncation must be none, gaussian or uniform, not {config.truncation!r}")
        super().__init__(config, backbone, reward)

    def draw_grad_steps(self, generator: torch.Generator) -> int | None:
        """K, the number of final steps with gradients: None (full chain) or ``T − k``."""
        cfg, T = self.config, self.sampler.num_steps
        if cfg.truncation == "none":
            return None
        if cfg.truncation == "uniform":
            return T - int(torch.randint(0, T, (1,), generator=generator))
        if T < 2:
            raise ValueError("gaussian truncation needs num_steps >= 2")
        while True:  # AlignProp v2: while not (1 <= k < T): k = int(Normal(mean, std))
            k = int(cfg.truncation_mean * T + cfg.truncation_std * T * float(torch.randn((), generator=generator)))
            if 1 <= k < T:
                return T - k

    def images(self, batch):
        cfg = self.config
        cond, uncond = self.conditioning(batch.prompts)
        K = self.draw_grad_steps(self.generator(batch, "truncation"))
        out = sample_with_grad(self.backbone, self.sampler, cond, uncond=uncond, guidance_scale=cfg.guidance_scale,
                               grad_steps=K, checkpoint=cfg.checkpoint, generator=self.generator(batch, "noise"),
                               **self._size())
        return out.images, batch.prompts, {"grad_steps": torch.tensor(float(len(out.grad_steps)))}


@register_method("draft", DRaFTConfig, kind="backprop")
class DRaFT(RewardBackprop):
    """DRaFT-K (:class:`DRaFTConfig`): gradients through the last ``k`` steps."""

    def images(self, batch):
        cfg = self.config
        cond, uncond = self.conditioning(batch.prompts)
        out = sample_with_grad(self.backbone, self.sampler, cond, uncond=uncond, guidance_scale=cfg.guidance_scale,
                               grad_steps=cfg.k, checkpoint=cfg.checkpoint, generator=self.generator(batch, "noise"),
                               **self._size())
        return out.images, batch.prompts, {"grad_steps": torch.tensor(float(len(out.grad_steps)))}


@register_method("draft-lv", DRaFTLVConfig, kind="backprop")
class DRaFTLV(RewardBackprop):
    """DRaFT-LV (:class:`DRaFTLVConfig`): DRaFT-1 plus ``n`` re-noised one-step copies per prompt."""

    def __init__(self, config: DRaFTLVConfig, backbone, reward=None):
        if config.n < 0:
            raise ValueError(f"method.n must be >= 0, got {config.n}")
        super().__init__(config, backbone, reward)

    def images(self, batch):
        cfg, bb, T = self.config, self.backbone, self.sampler.num_steps
        cond, uncond = self.conditioning(batch.prompts)
        out = sample_with_grad(bb, self.sampler, cond, uncond=uncond, guidance_scale=cfg.guidance_scale, grad_steps=1,
                               checkpoint=cfg.checkpoint, generator=self.generator(batch, "noise"), **self._size())
        images, prompts = [out.images], list(batch.prompts)
        if cfg.n:
            x0 = out.latents.detach().repeat(cfg.n, 1, 1, 1)                  # [n·B, C, h, w]
            g = self.generator(batch, "renoise")
            noise = torch.randn(x0.shape, generator=g).to(x0)
            t = self.sampler.timesteps[T - 1].expand(len(x0))
            x_t = bb.forward_process.add_noise(x0, noise, t.to(x0.device))     # the last step's noise level
            x0_n = predict_x0(bb, self.sampler, x_t, T - 1, Conditioning.cat([cond] * cfg.n),
                              uncond=None if uncond is None else Conditioning.cat([uncond] * cfg.n),
                              guidance_scale=cfg.guidance_scale, checkpoint=cfg.checkpoint)
            images.append(bb.decode_latents(x0_n, grad=True))
            prompts += list(batch.prompts) * cfg.n
        return torch.cat(images), prompts, {}


@register_method("refl", ReFLConfig, kind="backprop")
class ReFL(RewardBackprop):
    """ReFL (:class:`ReFLConfig`): the reward on a one-step x̂0 from a random late step, plus
    ``pretrain_weight`` × the denoising loss on a batch of ``pretrain_data`` (anything with
    ``batch(step, micro, process, num_processes) -> TrainBatch``)."""

    def __init__(self, config: ReFLConfig, backbone, reward=None, pretrain_data=None):
        super().__init__(config, backbone, reward)
        if config.pretrain_weight < 0:
            raise ValueError(f"method.pretrain_weight must be >= 0, got {config.pretrain_weight}")
        if config.pretrain_weight > 0 and pretrain_data is None:
            raise ValueError("ReFL's pre-training regulariser needs a data source (method.pretrain_data); "
                             "set method.pretrain_weight=0 to train without it (outputs degrade)")
        self.pretrain_data = pretrain_data
        T = self.sampler.num_steps
        lo, hi = config.step_range if config.step_range is not None else refl_step_range(T)
        if not 0 <= lo <= hi < T:
            raise ValueError(f"method.step_range must satisfy 0 <= lo <= hi < num_steps={T}, got {[lo, hi]}")
        self.step_range = (int(lo), int(hi))

    def reward_loss(self, rewards):
        cfg = self.config
        if cfg.margin is None:
            return -cfg.loss_scale * rewards
        return cfg.loss_scale * torch.relu(cfg.margin - rewards)

    def images(self, batch):
        cfg = self.config
        cond, uncond = self.conditioning(batch.prompts)
        lo, hi = self.step_range
        j = int(torch.randint(lo, hi + 1, (1,), generator=self.generator(batch, "refl-step")))
        out = refl_x0(self.backbone, self.sampler, cond, uncond=uncond, guidance_scale=cfg.guidance_scale, step=j,
                      checkpoint=cfg.checkpoint, generator=self.generator(batch, "noise"), **self._size())
        return out.images, batch.prompts, {"refl_step": torch.tensor(float(j))}

    def extra_loss(self, batch):
        if self.config.pretrain_weight == 0:
            return None, {}
        data = self.pretrain_data.batch(batch.step, batch.micro, batch.process, batch.num_processes)
        pretrain = self.errors(data).mean()                                     # ε/v/flow MSE on data
        return self.config.pretrain_weight * pretrain, {"pretrain_loss": pretrain.detach()}


def load_backprop_reward(spec: str | dict[str, float], kwargs: dict[str, Any] | None = None):
    """The reward model(s) in differentiable mode, frozen. ``{name: weight}`` gives a weighted sum
    of raw scores (no normalisation; ``kwargs`` go to every factory)."""
    from diffalign.rewards import WeightedReward, load_reward

    kwargs = dict(kwargs or {})
    if isinstance(spec, dict):
        rewards = [load_reward(name, mode="differentiable", **kwargs) for name in spec]
        reward = WeightedReward(rewards, weights={r.name: float(w) for r, w in zip(rewards, spec.values())},
                                normalize=None)
        reward.mode = "differentiable"
    else:
        reward = load_reward(spec, mode="differentiable", **kwargs)
    return reward.eval().requires_grad_(False)


def build_backprop_method(recipe: Recipe, backbone, accelerator=None) -> RewardBackprop:
    """The recipe's reward-backprop method (registered with ``kind="backprop"``) with its reward and,
    for ReFL, its pre-training data."""
    section = recipe.method
    cls, config = section.entry.method_class, copy.deepcopy(section.config)
    if cls.kind != "backprop":
        raise ValueError(f"method {section.name!r} is not a reward-backprop method (its kind is {cls.kind!r})")
    if cls is not ReFL:
        return cls(config, backbone)
    pretrain = None
    if config.pretrain_weight > 0:
        pretrain = _pretrain_data(recipe, config, backbone, accelerator)
    return ReFL(config, backbone, pretrain_data=pretrain)


def _pretrain_data(recipe: Recipe, config: ReFLConfig, backbone, accelerator):
    cfg = recipe.train
    if config.pretrain_data == "shapes":
        size = config.resolution
        if size is None:
            pipe = backbone.pipeline
            size = (getattr(pipe, "default_sample_size", None) or backbone.raw_denoiser.config.sample_size) \
                * pipe.vae_scale_factor
        from diffalign.shapes.training_data import ShapesPretrainData

        return ShapesPretrainData(backbone, cfg.batch_size, cfg.gradient_accumulation_steps, cfg.seed, int(size))
    if config.pretrain_data == "data":
        from diffalign.trainers.data import load_training_data

        if not recipe.data.source:
            raise ValueError("ReFL's pre-training regulariser reads the recipe's data section, which has no "
                             "data.source; give one (preference pairs: their chosen images are used), use "
                             "method.pretrain_data=shapes on the Shapes world, or method.pretrain_weight=0")
        return load_training_data(recipe, "chosen", backbone, Path(cfg.output_dir), accelerator)
    raise ValueError(f"method.pretrain_data must be 'data' or 'shapes', not {config.pretrain_data!r}")


__all__ = [
    "AlignProp",
    "AlignPropConfig",
    "DRaFT",
    "DRaFTConfig",
    "DRaFTLV",
    "DRaFTLVConfig",
    "PromptBatch",
    "PromptData",
    "ReFL",
    "ReFLConfig",
    "RewardBackprop",
    "RewardBackpropConfig",
    "build_backprop_method",
    "load_backprop_reward",
    "load_prompts",
]
