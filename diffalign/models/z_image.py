"""Z-Image: a 6B single-stream DiT (``ZImageTransformer2DModel``) on a Qwen3-4B text encoder and a 16-channel
``AutoencoderKL``, sampled by ``ZImagePipeline``.

What this adapter hides from the core (flow_frontier.md §10.7):

* the prompt goes through the tokenizer's chat template (``enable_thinking=True``), the text encoder's
  penultimate hidden states are kept for the real tokens only; the transformer takes a *list* of per-prompt
  features, the core a right-padded ``[B, S, D]`` with :attr:`Conditioning.mask`;
* the transformer takes a list of ``[C, 1, h, w]`` latents and the reversed time ``(1000 − t)/1000 = 1 − σ``,
  and predicts the *negative* velocity: :meth:`ZImageBackbone.predict` returns ``ε − x0`` for ``[B, C, h, w]``
  and ``1000·σ``, as every other flow backbone;
* latents are ``(z − shift_factor)·scaling_factor`` (the shared :class:`Backbone` code);
* sampling uses ``σ = linspace(1, 1/T, T)`` and the scheduler's shift; CFG is the pipeline's
  ``c + w (c − u)`` (``cfg_normalization`` off, ``cfg_truncation`` 1.0: its defaults).
"""

from __future__ import annotations

import torch

from diffalign.models.backbone import UNET_LORA_TARGETS, Backbone
from diffalign.models.base import Conditioning
from diffalign.models.qwen_image import pipeline_flow_schedule

Z_IMAGE_DEFAULT_SIZE = 1024
"""The pipeline's image side when none is given (``height = height or 1024``)."""


class ZImageBackbone(Backbone):
    """Z-Image text-to-image (``ZImagePipeline``, e.g. ``Tongyi-MAI/Z-Image-Turbo``, ``Tongyi-MAI/Z-Image``).

    Training: ``x_σ = (1−σ)x0 + σε``, target ``ε − x0``, σ from the scheduler's init grid (shifted by its
    static ``shift``, as in diffusers' Z-Image LoRA script). LoRA targets are diffusers' script defaults
    (``to_k, to_q, to_v, to_out.0`` of every attention block).

    ``guidance_scale`` keeps the pipeline's meaning: ``c + w (c − u)`` (diffalign runs CFG for ``w > 1``;
    the pipeline already for ``w > 0``). ``max_sequence_length``: text tokens (the pipeline's 512).
    """

    family = "z-image"
    pipeline_class_name = "ZImagePipeline"
    denoiser_name = "transformer"
    lora_targets = UNET_LORA_TARGETS
    max_sequence_length: int = 512

    def __init__(self, pipeline):
        if getattr(pipeline, "transformer", None) is None:
            raise ValueError("this Z-Image pipeline has no transformer")
        if getattr(pipeline, "default_sample_size", None) is None:  # what samplers and evaluation read
            pipeline.default_sample_size = Z_IMAGE_DEFAULT_SIZE // pipeline.vae_scale_factor
        super().__init__(pipeline)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """``prompt_embeds [B, S, D]``: each prompt's penultimate Qwen3 hidden states over its real tokens (as the
        pipeline keeps them), right-padded with zeros to the longest, and ``mask [B, S]``."""
        embeds, _ = self.pipeline.encode_prompt(list(prompts), device=self.device, do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_sequence_length)
        lengths = [e.shape[0] for e in embeds]
        out = embeds[0].new_zeros(len(embeds), max(lengths), embeds[0].shape[-1])
        mask = torch.zeros(len(embeds), max(lengths), dtype=torch.long, device=out.device)
        for i, e in enumerate(embeds):
            out[i, :lengths[i]] = e
            mask[i, :lengths[i]] = 1
        return Conditioning(out, mask=mask)

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Flow velocity ``ε − x0`` ``[B, C, h, w]`` of latents ``[B, C, h, w]``; ``timesteps`` ``[B]`` is ``1000·σ``.

        The transformer is called as the pipeline calls it (a list of ``[C, 1, h, w]`` latents, each prompt's
        unpadded features, time ``(1000 − t)/1000``) and its output negated."""
        embeds = cond.prompt_embeds.to(x_t.device, x_t.dtype)
        mask = cond.mask
        caps = list(embeds.unbind(0)) if mask is None else [e[m.bool()] for e, m in zip(embeds, mask.to(x_t.device))]
        t = (1000 - timesteps.to(x_t.device, torch.float32)) / 1000
        out = self.denoiser(list(x_t.unsqueeze(2).unbind(0)), t, caps, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """The pipeline's CFG: ``c + w (c − u)`` (no norm clipping: ``cfg_normalization`` is off by default)."""
        return cond + scale * (cond - uncond)

    def flow_schedule(self, num_steps: int, height: int | None = None, width: int | None = None) -> dict:
        """The pipeline's ``sigmas = linspace(1, 1/T, T)`` (and ``μ``, used only with dynamic shifting)."""
        schedule = pipeline_flow_schedule(self, num_steps, height, width)
        if not self.scheduler.config.get("use_dynamic_shifting", False):
            schedule["mu"] = None
        return schedule
