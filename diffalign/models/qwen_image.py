"""Qwen-Image: a 20B MMDiT (``QwenImageTransformer2DModel``) on a Qwen2.5-VL-7B text encoder and a causal 3-D
VAE (``AutoencoderKLQwenImage``), sampled by ``QwenImagePipeline``.

What this adapter hides from the core (flow_frontier.md §10.5):

* the prompt goes through the pipeline's chat template, whose first 34 tokens are dropped; prompts give
  embeddings of different lengths, right-padded, with the mask carried in :attr:`Conditioning.mask`;
* the VAE is a video VAE: images are one-frame clips ``[B, 3, 1, H, W]``, latents are normalised per channel
  with ``latents_mean`` / ``latents_std``; the core sees ``[B, C, h, w]``;
* the transformer takes 2×2-packed tokens ``[B, h·w/4, 4C]`` with ``img_shapes`` and ``timestep = σ``;
  :meth:`QwenImageBackbone.predict` packs and unpacks;
* sampling uses ``σ = linspace(1, 1/T, T)`` shifted by the resolution-dependent ``μ`` (dynamic shifting); true
  CFG rescales the guided prediction to the conditional one's per-token norm.
"""

from __future__ import annotations

import numpy as np
import torch

from diffalign.models.backbone import SD3_LORA_TARGETS, Backbone
from diffalign.models.base import Conditioning

QWEN_IMAGE_LORA_TARGETS = SD3_LORA_TARGETS + ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                                              "txt_mlp.net.2"]
"""flow_grpo's Qwen-Image recipe (flow_frontier.md §1.8): the joint attention's eight projections and both
streams' MLPs. diffusers' DreamBooth script defaults to ``to_k, to_q, to_v, to_out.0`` alone."""


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, h·w/4, 4C]``: each 2×2 patch one token (the pipeline's ``_pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[B, h·w/4, 4C]`` → ``[B, C, h, w]`` (the inverse of :func:`pack_latents`)."""
    b, _, d = tokens.shape
    return tokens.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h, w)


def pipeline_flow_schedule(backbone: Backbone, num_steps: int, height: int | None, width: int | None) -> dict:
    """``sigmas = linspace(1, 1/T, T)`` and ``μ`` of the image's token count (2×2 patches of the latents), with the
    scheduler config's shift bounds and the pipelines' fallbacks, as Qwen-Image's, Z-Image's and FLUX.1's pipelines
    pass them to ``set_timesteps``."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    pipe = backbone.pipeline
    f = pipe.vae_scale_factor
    default = pipe.default_sample_size * f
    height, width = int(height or default), int(width or default)
    image_seq_len = (height // f // 2) * (width // f // 2)
    cfg = backbone.scheduler.config
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    return {"sigmas": np.linspace(1.0, 1 / num_steps, num_steps).tolist(), "mu": float(mu)}


class QwenImageBackbone(Backbone):
    """Qwen-Image text-to-image (``QwenImagePipeline``, e.g. ``Qwen/Qwen-Image``).

    Training follows diffusers' Qwen-Image LoRA script: ``x_σ = (1−σ)x0 + σε``, target ``ε − x0``, σ from the
    scheduler's init grid, which is unshifted for Qwen-Image's dynamic-shifting config (``shift`` 1.0; the
    sampling shift depends on the resolution and is :meth:`flow_schedule`'s).

    ``max_sequence_length``: text tokens after the template (the pipeline's default 512).
    """

    family = "qwen-image"
    pipeline_class_name = "QwenImagePipeline"
    denoiser_name = "transformer"
    lora_targets = QWEN_IMAGE_LORA_TARGETS
    token_packing = 4
    max_sequence_length: int = 512

    def __init__(self, pipeline):
        if getattr(pipeline, "transformer", None) is None:
            raise ValueError("this Qwen-Image pipeline has no transformer")
        if pipeline.transformer.config.get("guidance_embeds", False):
            raise ValueError("guidance-distilled Qwen-Image transformers (guidance_embeds) are not supported")
        super().__init__(pipeline)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """``prompt_embeds [B, S, D]`` (the text encoder's last hidden states after the template's 34 prefix
        tokens, right-padded to the longest prompt) and ``mask [B, S]``, as the pipeline computes them."""
        embeds, mask = self.pipeline.encode_prompt(list(prompts), device=self.device,
                                                   max_sequence_length=self.max_sequence_length)
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return Conditioning(embeds, mask=mask)

    # ------------------------------------------------------------------ latents
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=torch.float32).view(shape)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=torch.float32).view(shape)
        return mean, std

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None,
                      chunk_size: int = 8) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` of images ``[B, 3, H, W]`` in [-1, 1]: each image a one-frame clip through the
        video VAE, normalised as the pipelines do, ``(z − latents_mean) / latents_std``, frame axis dropped."""
        out = []
        for chunk in pixels.split(chunk_size):
            dist = self.vae.encode(chunk.unsqueeze(2).to(self.vae.device, self.vae.dtype)).latent_dist
            z = (dist.sample(generator) if sample else dist.mode()).float()
            mean, std = self._latent_stats(z)
            out.append(((z - mean) / std)[:, :, 0])
        return torch.cat(out)

    def decode_latents(self, latents: torch.Tensor, *, chunk_size: int = 8, grad: bool = False) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] (fp32) from latents ``[B, C, h, w]`` (the pipeline's decode)."""
        out = []
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            for chunk in latents.split(chunk_size):
                z = chunk.float().unsqueeze(2)
                mean, std = self._latent_stats(z)
                z = (z * std + mean).to(self.vae.device, self.vae.dtype)
                out.append((self.vae.decode(z).sample[:, :, 0].float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)

    # ------------------------------------------------------------------ denoiser
    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Flow velocity ``[B, C, h, w]`` of latents ``[B, C, h, w]``; ``timesteps`` ``[B]`` is ``1000·σ``.

        Packs 2×2 patches into tokens with ``img_shapes = (1, h/2, w/2)``, calls the transformer with the text
        mask (None when every token is real, as the pipeline passes it) and ``timestep / 1000``, and unpacks.
        """
        b, _, h, w = x_t.shape
        if h % 2 or w % 2:
            raise ValueError(f"Qwen-Image packs 2×2 latent patches: latents of {h}×{w} must have even sides")
        mask = cond.mask
        if mask is not None:
            mask = mask.to(x_t.device)
            mask = None if bool(mask.bool().all()) else mask
        out = self.denoiser(hidden_states=pack_latents(x_t), timestep=timesteps.to(x_t.device, x_t.dtype) / 1000,
                            encoder_hidden_states=cond.prompt_embeds.to(x_t.device, x_t.dtype),
                            encoder_hidden_states_mask=mask, img_shapes=[[(1, h // 2, w // 2)]] * b,
                            return_dict=False)[0]
        return unpack_latents(out, h, w)

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """The pipeline's true CFG: ``g = u + w (c − u)``, then ``g · ‖c‖ / ‖g‖`` per packed token (2×2 patch ×
        channels), so guidance changes the direction of each token's prediction, not its norm."""
        h, w = cond.shape[-2:]
        c, g = pack_latents(cond), pack_latents(uncond + scale * (cond - uncond))
        g = g * (torch.norm(c, dim=-1, keepdim=True) / torch.norm(g, dim=-1, keepdim=True))
        return unpack_latents(g, h, w)

    def flow_schedule(self, num_steps: int, height: int | None = None, width: int | None = None) -> dict:
        """The pipeline's ``sigmas = linspace(1, 1/T, T)`` and resolution-dependent ``μ``."""
        return pipeline_flow_schedule(self, num_steps, height, width)
