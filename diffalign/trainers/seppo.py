"""SePPO (Zhang et al., 2024, arXiv:2410.05255): semi-policy preference optimisation.

Only *winning* images are given (off-policy: Pick-a-Pic winners, an SFT set, or Shapes renders).
The *losing* side of each pair is an on-policy sample of a reference model that is a previous
checkpoint of the run itself; an anchor-based criterion decides per sample whether that reference
sample is learned from as a loser or as a winner.

The authors released no training code (DwanZhang-AI/SePPO holds evaluation scripts only), so this
module follows the paper's description; every choice the paper leaves open is listed here.

1. **Loss**: Diffusion-DPO's (the paper builds on it) with the reference sample ``l`` as the
   second image, the winner ``w`` and ``l`` noised with the same noise and timestep, and per-sample
   errors ``L = mean((target − pred)²)``::

       Δ_w = L_θ(w) − L_ref(w),    Δ_l = L_θ(l) − L_ref(l)
       loss = −log σ(−½β (Δ_w − I·Δ_l))

   ``β = 5000`` (the official Diffusion-DPO value for SD1.5; the paper's β is not stated in what we
   could read). The reference network in the loss is the checkpoint that drew ``l``.
2. **Anchor-based criterion** (the paper's "Anchor-based Adaptive Flipper"), with the winning image
   as the anchor: if the policy denoises the anchor *worse* than the reference does (``Δ_w > 0``),
   the reference model is judged the better model on this prompt, its sample is likely a winning
   image, and the contrastive term is flipped (``I = −1``: both likelihoods are raised); otherwise
   (``Δ_w ≤ 0``) the reference sample is treated as losing (``I = +1``, standard DPO). The
   criterion is evaluated per sample at every step, on the current policy (no gradient through it).
   With ``anchor_flip: false`` every reference sample is a loser (SPIN-Diffusion's self-play).
3. **Reference selection** (the paper's strategy that "expands exploration in the policy space"):
   the pool holds the initial model and a snapshot of the trainable weights after every
   ``snapshot_every`` epochs; each epoch draws its reference uniformly at random from the pool
   (``reference_selection: random``). ``latest`` (the previous checkpoint, SPIN-like) and
   ``initial`` are the ablations the paper compares against.
4. **Epoch**: ``steps_per_epoch`` optimizer steps. At its start the chosen reference samples one
   image for every winner the epoch will train on (the sampler of ``num_steps`` steps with
   ``eta`` (default 0: deterministic DDIM / ODE) and CFG ``guidance_scale``), and its denoising
   errors on ``w`` and ``l`` are computed then, once (the reference is fixed for the epoch).
5. **Winners** (``winners``): ``data`` takes the preferred image of each pair of the recipe's data
   section (Pick-a-Pic ``label_0``, JSONL ``chosen``); ``shapes-render`` renders a ground-truth
   scene for each prompt of ``prompts`` (the Shapes world's winning images).
6. **Representation**: a reference sample is decoded to an image and encoded again by the VAE
   (posterior mode), exactly as the winning images are, so the pair differs in content and not in
   where its latents come from (raw sampler latents vs encoder latents: without this round trip
   the policy learns that difference, whichever images win).

The initial model is the LoRA disabled (or the frozen copy of a full fine-tune); a snapshot is put
in place by copying the trainable weights in and back out (LoRA: a few MB; full fine-tuning keeps
whole denoiser copies on the CPU: bound the pool with ``max_pool``; FSDP is not supported).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from diffalign.core.likelihood import denoising_error, elbo_loglik
from diffalign.core.positions import stable_seed
from diffalign.core.sampling import sample_trajectory
from diffalign.models.base import Conditioning
from diffalign.objectives.online import seppo_loss
from diffalign.trainers.method import StepOutput, register_method
from diffalign.trainers.online import (
    Micro,
    OnlineMethod,
    Rollout,
    RolloutConfig,
    load_prompts,
)

REFERENCE_SELECTIONS = ("random", "latest", "initial")


@dataclass
class SePPOConfig(RolloutConfig):
    """SePPO (module docstring for where each default comes from).

    Attributes:
        beta: Diffusion-DPO β on per-sample mean squared errors (5000, official Diffusion-DPO SD1.5).
        anchor_flip: apply the anchor-based criterion (else every reference sample is a loser).
        reference_selection: ``random`` (the paper's), ``latest`` or ``initial``.
        snapshot_every: epochs between snapshots added to the reference pool.
        max_pool: keep at most this many snapshots (the oldest go first; the initial model stays).
        steps_per_epoch: optimizer steps per rollout.
        winners: ``data`` (the recipe's data section) or ``shapes-render``.
    """

    num_steps: int = 20
    eta: float | None = 0.0
    guidance_scale: float = 7.5
    beta: float = 5000.0
    anchor_flip: bool = True
    reference_selection: str = "random"
    snapshot_every: int = 1
    max_pool: int | None = None
    steps_per_epoch: int = 10
    winners: str = "data"


@contextlib.contextmanager
def reference_weights(backbone, state: dict[str, torch.Tensor] | None) -> Iterator[None]:
    """Inside, the backbone's denoiser is the reference: the initial model (``state=None``: LoRA
    disabled / the frozen copy) or a snapshot of the trainable weights copied in (and back out on exit)."""
    if state is None:
        with backbone.reference():
            yield
        return
    params = {n: p for n, p in backbone.raw_denoiser.named_parameters() if p.requires_grad}
    current = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(current[n])


@dataclass
class _Pairs:
    """One micro-batch of (winner, reference sample) pairs, noised alike, with the reference's errors."""

    x_t: torch.Tensor          # [2b, C, h, w] winners then reference samples
    target: torch.Tensor       # [2b, C, h, w]
    timesteps: torch.Tensor    # [2b]
    cond: Conditioning         # [2b]
    ref_errors: torch.Tensor   # [2b]


@register_method("seppo", SePPOConfig, kind="online")
class SePPO(OnlineMethod):
    """SePPO: winners from data, losers sampled by a previous checkpoint (module docstring)."""

    trains_on_steps = False

    def __init__(self, config: SePPOConfig, backbone):
        if config.reference_selection not in REFERENCE_SELECTIONS:
            raise ValueError(f"unknown reference_selection {config.reference_selection!r}; "
                             f"choose from {REFERENCE_SELECTIONS}")
        if config.winners not in ("data", "shapes-render"):
            raise ValueError(f"winners must be 'data' or 'shapes-render', not {config.winners!r}")
        super().__init__(config, backbone)
        self.pool: list[tuple[int, dict[str, torch.Tensor]]] = []  # (epoch it was taken after, weights)
        self.winners = None

    def prepare(self, run) -> None:
        cfg, recipe = self.config, run.recipe
        if cfg.winners == "data":
            from diffalign.trainers.data import load_training_data

            self.winners = load_training_data(recipe, "chosen", self.backbone, run.output_dir, run.accelerator)
        else:
            pipe = self.backbone.pipeline
            default = (getattr(pipe, "default_sample_size", None) or self.backbone.raw_denoiser.config.sample_size)
            from diffalign.shapes.training_data import RenderedWinners

            self.winners = RenderedWinners(self.backbone, load_prompts(cfg.prompts, cfg.prompt_options),
                                           cfg.resolution or default * pipe.vae_scale_factor, recipe.train.batch_size,
                                           recipe.train.gradient_accumulation_steps, recipe.train.seed)

    # ---- rollout
    def select_reference(self, seed: int, epoch: int) -> int:
        """Index into ``[initial] + pool`` of this epoch's reference (0 = the initial model)."""
        choice = self.config.reference_selection
        if choice == "initial" or not self.pool:
            return 0
        if choice == "latest":
            return len(self.pool)
        g = torch.Generator().manual_seed(stable_seed(seed, "reference", epoch))
        return int(torch.randint(len(self.pool) + 1, (1,), generator=g))

    def rollout(self, run, epoch: int) -> Rollout:
        cfg, acc, train = self.config, run.accelerator, run.recipe.train
        bb = self.backbone
        index = self.select_reference(train.seed, epoch)
        state = None if index == 0 else self.pool[index - 1][1]
        g = torch.Generator(bb.device).manual_seed(stable_seed(train.seed, "rollout", epoch, acc.process_index))
        f = bb.pipeline.vae_scale_factor
        batches = []
        with reference_weights(bb, state):
            for k in range(cfg.steps_per_epoch):
                for micro in range(train.gradient_accumulation_steps):
                    w = self.winners.batch(epoch * cfg.steps_per_epoch + k, micro, acc.process_index,
                                           acc.num_processes)
                    h, wd = w.latents.shape[-2] * f, w.latents.shape[-1] * f
                    traj = sample_trajectory(bb, self.sampler, w.cond, guidance_scale=cfg.guidance_scale, generator=g,
                                             height=h, width=wd)
                    # the reference sample as an image, encoded like the winners (module docstring, 6.)
                    loser = bb.encode_images(bb.decode_latents(traj.final) * 2 - 1).to(w.latents)
                    fp = bb.forward_process
                    x_t = torch.cat([w.x_t, fp.add_noise(loser, w.noise, w.timesteps)])
                    target = torch.cat([w.target, fp.target(loser, w.noise, w.timesteps)])
                    t, cond = w.timesteps.repeat(2), Conditioning.cat([w.cond, w.cond])
                    ref_errors = denoising_error(bb.predict(x_t, t, cond), target)
                    batches.append(_Pairs(x_t, target, t, cond, ref_errors))
        reference_epoch = 0 if index == 0 else self.pool[index - 1][0] + 1
        return Rollout(None, [], extra={"pairs": batches},
                       metrics={"reference_epoch": float(reference_epoch), "pool_size": float(len(self.pool) + 1)})

    def num_units(self, rollout: Rollout) -> int:
        return len(rollout.extra["pairs"])

    def plan(self, rollout: Rollout, run, generator: torch.Generator) -> list[list[Micro]]:
        """The stored micro-batches in order, ``gradient_accumulation_steps`` per optimizer step."""
        accum = run.recipe.train.gradient_accumulation_steps
        n = self.num_units(rollout)
        return [[Micro(torch.tensor([i])) for i in range(s, min(s + accum, n))] for s in range(0, n, accum)]

    # ---- loss
    def loss(self, rollout: Rollout, micro: Micro) -> StepOutput:
        p: _Pairs = rollout.extra["pairs"][int(micro.units[0])]
        errors = denoising_error(self.backbone.predict(p.x_t, p.timesteps, p.cond), p.target)
        (pw, pl), (rw_ll, rl_ll) = elbo_loglik(errors).chunk(2), elbo_loglik(p.ref_errors).chunk(2)
        losses, logits, flipped = seppo_loss(pw, pl, rw_ll, rl_ll, beta=self.config.beta,
                                             anchor_flip=self.config.anchor_flip)
        ew, el = errors.detach().chunk(2)
        rw, rl = p.ref_errors.chunk(2)
        return StepOutput(losses.mean(), {
            "flip_frac": flipped.float().mean(),
            "implicit_acc": (logits.detach() > 0).float().mean() + 0.5 * (logits.detach() == 0).float().mean(),
            "model_mse_winner": ew.mean(), "model_mse_reference_sample": el.mean(),
            "ref_mse_winner": rw.mean(), "ref_mse_reference_sample": rl.mean(),
        })

    # ---- the reference pool
    def end_epoch(self, run, epoch: int) -> None:
        if (epoch + 1) % self.config.snapshot_every:
            return
        params = self.backbone.raw_denoiser.named_parameters()
        self.pool.append((epoch, {n: p.detach().to("cpu", copy=True) for n, p in params if p.requires_grad}))
        if self.config.max_pool is not None and len(self.pool) > self.config.max_pool:
            self.pool = self.pool[len(self.pool) - self.config.max_pool:]

    def save_state(self, folder: Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"{i}/{n}": v.contiguous() for i, (_, state) in enumerate(self.pool) for n, v in state.items()}
        (folder / "seppo_pool.json").write_text(json.dumps([e for e, _ in self.pool]))
        if tensors:
            save_file(tensors, str(folder / "seppo_pool.safetensors"))

    def load_state(self, folder: Path) -> None:
        from safetensors.torch import load_file

        epochs = json.loads((folder / "seppo_pool.json").read_text())
        tensors = load_file(str(folder / "seppo_pool.safetensors")) if epochs else {}
        self.pool = [(e, {k.split("/", 1)[1]: v for k, v in tensors.items() if k.split("/", 1)[0] == str(i)})
                     for i, e in enumerate(epochs)]
