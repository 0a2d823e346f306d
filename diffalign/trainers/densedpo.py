"""DenseDPO (Wu et al., Snap Research, 2025): Diffusion/Flow-DPO per temporal segment of a video pair.

A pair is two clips of one prompt, ``video_0`` and ``video_1``, with a label per segment (``+1``:
``video_0`` better there, ``-1``: ``video_1`` better, ``0``: tie); see :mod:`diffalign.data.video` for
the file format and the structural pairs the labels are put on. Both clips share noise and timestep.
For segment ``s`` the denoising error is restricted to that segment's latent frames,

    ``L_s = mean over latent frames f ∈ s (and C, h, w) of ‖pred − target‖²``,

and the segment's DPO logit, with ``ℓ = −½L`` and ``y_s = ±1``, is

    ``z_s = β·y_s·((ℓθ0_s − ℓr0_s) − (ℓθ1_s − ℓr1_s)) = −½β·y_s·((Lθ0_s − Lθ1_s) − (Lr0_s − Lr1_s))``.

The loss is ``−log σ(z_s)`` averaged over the labelled segments of the batch (pair weights applied);
tie segments are left out, so their frames get no gradient from the loss.

Trained by :func:`train` on the shared loop (``diffalign train pipelines/wan-densedpo.yaml``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffalign.core.likelihood import denoising_error, elbo_loglik
from diffalign.core.positions import stable_seed
from diffalign.objectives import DPO_LOSS_TYPES
from diffalign.objectives.online import segment_dpo_loss
from diffalign.trainers.data import TrainingData
from diffalign.trainers.loop import load_backbone_for_training
from diffalign.trainers.method import Method, StepOutput, TrainBatch, register_method


@dataclass
class DenseDPOConfig:
    """DenseDPO.

    Attributes:
        beta: KL strength on the segment ELBO surrogate ``ℓ = −½L_s``. 100 as flow_grpo's Flow-DPO uses
            for flow-matching models (the DenseDPO paper's β is not public: unverified). Segment errors
            are means, like whole-clip errors, so β means the same as in Diffusion-DPO.
        loss_type: ``sigmoid`` (DPO), ``ipo``, ``hinge`` or ``robust``, applied per segment.
        label_smoothing: conservative / robust DPO noise rate ε, per segment.
    """

    beta: float = 100.0
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"unknown loss type {self.loss_type!r}; choose from {DPO_LOSS_TYPES}")


@dataclass
class SegmentBatch(TrainBatch):
    """A :class:`TrainBatch` of video pairs (rows ``[video_0 × B, video_1 × B]``, latents
    ``[2B, C, F, h, w]``) with ``segment_masks`` ``[B, S, F]`` (1 on a segment's latent frames; padded
    segments are all 0) and ``segment_labels`` ``[B, S]`` (``+1`` / ``-1`` / ``0`` = tie or padding)."""

    segment_masks: torch.Tensor | None = None
    segment_labels: torch.Tensor | None = None


def segment_errors(prediction: torch.Tensor, target: torch.Tensor, masks: torch.Tensor,
                   frame_dim: int = 2) -> torch.Tensor:
    """Per-row, per-segment denoising errors ``[N, S]``: :func:`denoising_error` restricted by each
    segment's frame mask. ``prediction``/``target`` ``[N, C, F, h, w]``; ``masks`` ``[N, S, F]``."""
    shape = [masks.shape[0]] + [1] * (prediction.ndim - 1)
    shape[frame_dim] = masks.shape[-1]
    return torch.stack([denoising_error(prediction, target, masks[:, s].reshape(shape))
                        for s in range(masks.shape[1])], dim=1)


def densedpo_loss(policy_errors: torch.Tensor, ref_errors: torch.Tensor, labels: torch.Tensor,
                  weights: torch.Tensor, config: DenseDPOConfig) -> StepOutput:
    """The DenseDPO loss from segment errors ``[2B, S]`` (``video_0`` rows first), ``labels`` ``[B, S]``
    and pair ``weights`` ``[B]``: weighted mean of the per-segment DPO losses
    (:func:`~diffalign.objectives.online.segment_dpo_loss`) over labelled segments (a batch of ties only
    gives 0, still attached to the graph), and the method's metrics."""
    out, labelled = segment_dpo_loss(elbo_loglik(policy_errors), elbo_loglik(ref_errors), labels, beta=config.beta,
                                     loss_type=config.loss_type, label_smoothing=config.label_smoothing)
    w = weights.to(out.losses)[:, None].expand_as(labels)[labelled]
    loss = (out.losses * w).sum() / w.sum().clamp_min(1e-12)
    logits = out.logits.detach()
    n = labelled.sum()
    metrics = {
        "implicit_acc": ((logits > 0).float().sum() + 0.5 * (logits == 0).float().sum()) / n.clamp_min(1),
        "reward_margin": (out.chosen_rewards - out.rejected_rewards).sum() / n.clamp_min(1),
        "labelled_segments": n.float(),
        "tie_segments": (labels == 0).float().sum(),
        "model_mse_0": policy_errors.detach().chunk(2)[0].mean(),
        "model_mse_1": policy_errors.detach().chunk(2)[1].mean(),
    }
    return StepOutput(loss, metrics)


@register_method("densedpo", DenseDPOConfig, kind="video")
class DenseDPO(Method):
    """Segment-level DPO on video pairs (a :class:`SegmentBatch`)."""

    data_kind = "segment-pairs"

    # ---- the engine's hooks (diffalign.trainers.loop.setup)
    @classmethod
    def load_model(cls, recipe, accelerator):
        """A video backbone (e.g. Wan 2.1), trainable; anything else is refused."""
        from diffalign.models.video import VideoBackbone

        if recipe.train.validation_steps and recipe.train.validation_prompts:
            raise ValueError("densedpo: validation sampling is image-only in the shared loop; set "
                             "train.validation_steps=0")
        backbone = load_backbone_for_training(recipe, accelerator)
        if not isinstance(backbone, VideoBackbone):
            raise TypeError(f"densedpo needs a video backbone (e.g. a Wan text-to-video model), not "
                            f"{backbone.family!r}")
        return backbone

    def training_data(self, run) -> VideoPairData:
        """The segment-labelled video pairs of the recipe's data section."""
        return load_video_pair_data(run.recipe, run.backbone, run.output_dir)

    def segment_errors(self, batch: SegmentBatch, *, reference: bool = False) -> torch.Tensor:
        """``[2B, S]`` errors of the policy (or, without gradients, the reference)."""
        masks = batch.segment_masks.repeat(2, 1, 1)
        frame_dim = getattr(self.backbone, "frame_dim", 2)
        if not reference:
            return segment_errors(self.backbone.predict(batch.x_t, batch.timesteps, batch.cond), batch.target, masks,
                                  frame_dim)
        with torch.no_grad(), self.backbone.reference():
            return segment_errors(self.backbone.predict(batch.x_t, batch.timesteps, batch.cond), batch.target, masks,
                                  frame_dim)

    def loss(self, batch: SegmentBatch) -> StepOutput:
        return densedpo_loss(self.segment_errors(batch), self.segment_errors(batch, reference=True),
                             batch.segment_labels, batch.weights, self.config)


# ---------------------------------------------------------------- data: run position -> SegmentBatch


class VideoPairData(TrainingData):
    """:class:`~diffalign.trainers.data.TrainingData` over :class:`~diffalign.data.video.VideoPair` items:
    the same run-position determinism (order, caption dropout, noise, timestep from ``(seed, position)``)
    and latent/text cache; clips are used at their stored size (checked against the model)."""

    def batch(self, step: int, micro: int, process: int, num_processes: int) -> SegmentBatch:
        from diffalign.data.video import load_clip, segment_masks

        positions = self.positions(step, micro, process, num_processes)
        gens = self.example_generators(positions)
        items = [self.item_at(p) for p in positions]
        clips, prompts, masks, labels = [[], []], [], [], []
        for item, g in zip(items, gens):
            drop = self.caption_dropout > 0 and torch.rand((), generator=g).item() < self.caption_dropout
            prompts.append("" if drop else item.prompt)
            for k, path in enumerate((item.video_0, item.video_1)):
                clip = load_clip(path)
                if clip.shape[1] != item.num_frames:
                    raise ValueError(f"{item.source}: {path} now has {clip.shape[1]} frames, not {item.num_frames}")
                self.backbone.check_frame_size(*clip.shape[2:])
                clips[k].append(clip * 2 - 1)
            masks.append(segment_masks(item.segment_starts, item.num_frames,
                                       self.backbone.latent_frame_spans(item.num_frames)))
            labels.append(torch.tensor(item.labels, dtype=torch.long))
        shapes = {tuple(c.shape) for c in clips[0] + clips[1]}
        if len(shapes) > 1:
            raise ValueError(f"clips of one micro-batch differ in shape {sorted(shapes)} ({[i.source for i in items]}); "
                             "use train.batch_size=1 or clips of one size")
        rows = clips[0] + clips[1]
        keys = [f"{i.key}:video_0" for i in items] + [f"{i.key}:video_1" for i in items]
        device = self.backbone.device
        latents = self.encode_latents(torch.stack(rows), keys).to(device)
        cond = self.encode_text(prompts + prompts).to(device)

        s_max = max(len(lab) for lab in labels)
        mask_t = torch.zeros(len(items), s_max, latents.shape[2])
        label_t = torch.zeros(len(items), s_max, dtype=torch.long)
        for i, (m, lab) in enumerate(zip(masks, labels)):
            mask_t[i, :m.shape[0]], label_t[i, :lab.shape[0]] = m, lab

        noisy = self.backbone.forward_process.noise_examples(latents, gens, group_size=2)
        return SegmentBatch(
            latents=latents, noise=noisy.noise, x_t=noisy.x_t, target=noisy.target,
            timesteps=noisy.timesteps, cond=cond, weights=torch.tensor([i.weight for i in items], device=device),
            segment_masks=mask_t.to(device), segment_labels=label_t.to(device))


def load_video_pair_data(recipe, backbone, output_dir: Path) -> VideoPairData:
    """The recipe's ``data`` section (``format: video-segments``, ``source``: a segment-labelled JSONL)
    read and checked against the backbone's latent frames."""
    from diffalign.data.cache import LatentCache
    from diffalign.data.video import check_latent_coverage, read_video_pairs

    d = recipe.data
    if d.format != "video-segments":
        raise ValueError(f"densedpo reads data.format 'video-segments' (a segment-labelled JSONL), not {d.format!r}")
    if not d.source or not isinstance(d.source, str):
        raise ValueError("the recipe's data.source must be one segment-labelled JSONL file")
    items = read_video_pairs(d.source)
    for item in items:
        backbone.check_num_frames(item.num_frames)
        check_latent_coverage(item, backbone.latent_frame_spans(item.num_frames))
    items = items[:d.max_samples] if d.max_samples is not None else items
    if not any(y != 0 for item in items for y in item.labels):
        raise ValueError(f"{d.source}: every segment is a tie; nothing to train on")
    cache = None
    if d.cache_dir != "":
        root = Path(d.cache_dir) if d.cache_dir else output_dir / "cache"
        namespace = stable_seed(recipe.model.pretrained, recipe.model.revision, recipe.model.variant, "video",
                                 str(backbone.vae.dtype))
        cache = LatentCache(root, namespace=f"{namespace:016x}")
    return VideoPairData(items=items, kind="segment-pairs", backbone=backbone, resolution=0,
                         batch_size=recipe.train.batch_size,
                         gradient_accumulation_steps=recipe.train.gradient_accumulation_steps, seed=recipe.train.seed,
                         caption_dropout=d.caption_dropout, cache=cache)


