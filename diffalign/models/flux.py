"""FLUX.1: a 12B MMDiT (``FluxTransformer2DModel``: double-stream then single-stream blocks) on CLIP-L (pooled) and
T5-XXL (sequence) text encoders and a 16-channel ``AutoencoderKL``, sampled by ``FluxPipeline``.

What this adapter hides from the core (flow_frontier.md §10.3):

* the prompt goes through the pipeline's ``encode_prompt``: CLIP-L's pooled output ``[B, 768]`` (→
  ``pooled_projections``) and T5's last hidden states ``[B, 512, 4096]`` padded to ``max_sequence_length``;
  ``txt_ids`` are zeros ``[S, 3]`` and rebuilt at each call;
* latents are ``(z − shift_factor)·scaling_factor`` (the shared :class:`Backbone` code);
* the transformer takes 2×2-packed tokens ``[B, h·w/4, 4C]`` (the packing of :mod:`~diffalign.models.qwen_image`)
  with latent image ids ``[h/2·w/2, 3] = [0, row, col]`` and ``timestep = σ``; it predicts the flow velocity
  ``ε − x0``, as SD3's transformer;
* FLUX.1-dev is guidance-distilled (``guidance_embeds``): the guidance weight is an *input* of the transformer,
  not a second pass. :attr:`FluxBackbone.embeds_guidance` tells the core so: a sampler's ``guidance_scale`` goes
  to the embedding and classifier-free guidance never runs (the pipeline's ``true_cfg_scale`` 1.0). FLUX.1-schnell
  has no embedding: there ``guidance_scale > 1`` is true CFG ``u + w (c − u)`` with the negative prompt ``""``;
* sampling uses ``σ = linspace(1, 1/T, T)`` shifted by the resolution-dependent ``μ`` (dynamic shifting).
"""

from __future__ import annotations

import torch

from diffalign.models.backbone import SD3_LORA_TARGETS, Backbone
from diffalign.models.base import Conditioning
from diffalign.models.qwen_image import pack_latents, pipeline_flow_schedule, unpack_latents

FLUX_LORA_TARGETS = SD3_LORA_TARGETS + ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
"""diffusers' FLUX LoRA script (``train_dreambooth_lora_flux.py``, flow_frontier.md §10.3) and flow_grpo's FLUX
recipe (§1.8): the joint attention's eight projections (in the single-stream blocks the image stream's
``to_q/k/v``) and both streams' feed-forwards of the double-stream blocks."""

FLUX_TRAINING_GUIDANCE = 3.5
"""The guidance embedding during training: diffusers' FLUX script's ``--guidance_scale`` default, and the value
RL codebases sample and train at (flow_grpo, DanceGRPO, MixGRPO; flow_frontier.md §10.3)."""


def latent_image_ids(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """``[h/2 · w/2, 3]`` position ids of the packed tokens of ``[B, C, h, w]`` latents: ``[0, row, col]`` in the
    packing's row-major order (the pipeline's ``_prepare_latent_image_ids``)."""
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FluxBackbone(Backbone):
    """FLUX.1 text-to-image (``FluxPipeline``, e.g. ``black-forest-labs/FLUX.1-dev``, ``FLUX.1-schnell``).

    Training follows diffusers' FLUX LoRA script: ``x_σ = (1−σ)x0 + σε``, target ``ε − x0``, σ uniform
    (``weighting_scheme`` "none") on the scheduler's init grid, which is unshifted for FLUX's dynamic-shifting
    config (the sampling shift depends on the resolution and is :meth:`flow_schedule`'s).

    ``guidance_scale``: the guidance embedding of a :meth:`predict` that is given none (the trainers of off-line
    methods call it so); 3.5 as diffusers' script (its README examples pass 1.0). Samplers pass their own.
    ``max_sequence_length``: T5 tokens (the pipeline's and the script's 512).
    """

    family = "flux"
    pipeline_class_name = "FluxPipeline"
    denoiser_name = "transformer"
    lora_targets = FLUX_LORA_TARGETS
    token_packing = 4
    timestep_sampling = "uniform"
    max_sequence_length: int = 512
    guidance_scale: float = FLUX_TRAINING_GUIDANCE

    def __init__(self, pipeline):
        if getattr(pipeline, "transformer", None) is None:
            raise ValueError("this FLUX pipeline has no transformer")
        super().__init__(pipeline)

    @property
    def embeds_guidance(self) -> bool:
        """Guidance-distilled (FLUX.1-dev): the guidance weight is the transformer's ``guidance`` input, and a
        sampler's ``guidance_scale`` goes there instead of running classifier-free guidance."""
        return bool(self.raw_denoiser.config.get("guidance_embeds", False))

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """``prompt_embeds [B, max_sequence_length, D_T5]`` (T5's last hidden states) and ``pooled [B, D_CLIP]``
        (CLIP's pooled output), as the pipeline computes them."""
        embeds, pooled, _ = self.pipeline.encode_prompt(list(prompts), None, device=self.device,
                                                        num_images_per_prompt=1,
                                                        max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds, pooled)

    # ------------------------------------------------------------------ denoiser
    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning,
                guidance: float | None = None) -> torch.Tensor:
        """Flow velocity ``ε − x0`` ``[B, C, h, w]`` of latents ``[B, C, h, w]``; ``timesteps`` ``[B]`` is ``1000·σ``.

        As the pipeline calls the transformer: 2×2-packed tokens with their image ids, ``txt_ids`` zeros,
        ``timestep / 1000``, the pooled CLIP embedding, and ``guidance`` (default :attr:`guidance_scale`) as the
        guidance embedding's input ``[B]`` (fp32) when the transformer has one (ignored otherwise).
        """
        if cond.pooled is None:
            raise ValueError("FLUX needs the pooled CLIP embedding (Conditioning.pooled)")
        b, _, h, w = x_t.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX packs 2×2 latent patches: latents of {h}×{w} must have even sides")
        embeds = cond.prompt_embeds.to(x_t.device, x_t.dtype)
        g = None
        if self.embeds_guidance:
            g = torch.full((b,), self.guidance_scale if guidance is None else float(guidance), device=x_t.device,
                           dtype=torch.float32)
        out = self.denoiser(hidden_states=pack_latents(x_t), timestep=timesteps.to(x_t.device, x_t.dtype) / 1000,
                            guidance=g, pooled_projections=cond.pooled.to(x_t.device, x_t.dtype),
                            encoder_hidden_states=embeds,
                            txt_ids=torch.zeros(embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
                            img_ids=latent_image_ids(h, w, x_t.device, x_t.dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)

    def flow_schedule(self, num_steps: int, height: int | None = None, width: int | None = None) -> dict:
        """The pipeline's ``sigmas = linspace(1, 1/T, T)`` and ``μ = calculate_shift(h/16 · w/16)`` (FLUX's
        defaults 256 / 4096 / 0.5 / 1.15: a 1024² image has μ = 1.15)."""
        return pipeline_flow_schedule(self, num_steps, height, width)
