"""Text-to-video backbones: Wan 2.1 (``WanPipeline``: UMT5 text encoder, causal 3-D VAE, flow-matching DiT).

Latents are ``[B, C, F, h, w]`` (frame axis :attr:`VideoBackbone.frame_dim` = 2). The VAE is causal in
time: latent frame 0 encodes pixel frame 0 alone, and latent frame ``j ≥ 1`` encodes pixel frames
``[k(j−1)+1, kj]`` (``k`` = ``vae.config.scale_factor_temporal``, 4 for Wan), so a clip of ``T = 1 + k·n``
frames has ``F = 1 + n`` latent frames. :meth:`VideoBackbone.latent_frame_spans` gives that map;
DenseDPO reads it to restrict the denoising error to a temporal segment.

Everything else (loading, LoRA, the reference toggle, saving in diffusers format) is the shared
:class:`~diffalign.models.backbone.Backbone`.
"""

from __future__ import annotations

import torch

from diffalign.models.backbone import UNET_LORA_TARGETS, Backbone
from diffalign.models.base import Conditioning


class VideoBackbone(Backbone):
    """Shared part of video backbones: the frame axis and the pixel-frame ↔ latent-frame map."""

    frame_dim: int = 2
    causal_vae: bool = True

    @property
    def temporal_compression(self) -> int:
        """Pixel frames per latent frame (after the first, for a causal VAE)."""
        return int(self.vae.config.get("scale_factor_temporal", 4))

    @property
    def spatial_compression(self) -> int:
        return int(self.vae.config.get("scale_factor_spatial", 8))

    def latent_num_frames(self, num_frames: int) -> int:
        """Latent frames ``F`` of a clip of ``num_frames`` pixel frames."""
        k = self.temporal_compression
        return (num_frames - 1) // k + 1 if self.causal_vae else -(-num_frames // k)

    def latent_frame_spans(self, num_frames: int) -> list[tuple[int, int]]:
        """Half-open pixel-frame span ``(start, end)`` of each latent frame of a ``num_frames`` clip."""
        self.check_num_frames(num_frames)
        k = self.temporal_compression
        if not self.causal_vae:
            return [(j * k, min((j + 1) * k, num_frames)) for j in range(self.latent_num_frames(num_frames))]
        return [(0, 1)] + [(k * (j - 1) + 1, k * j + 1) for j in range(1, self.latent_num_frames(num_frames))]

    def check_num_frames(self, num_frames: int) -> None:
        k = self.temporal_compression
        if num_frames < 1 or (self.causal_vae and (num_frames - 1) % k):
            raise ValueError(f"{num_frames} frames: this {self.family} VAE needs 1 + {k}·n frames "
                             f"(e.g. {k * max(1, (num_frames - 1) // k) + 1})")

    def check_frame_size(self, height: int, width: int) -> None:
        """Frames must tile into whole latent pixels and transformer patches."""
        patch = getattr(self.raw_denoiser.config, "patch_size", None) or (1, 1, 1)
        mh, mw = self.spatial_compression * patch[1], self.spatial_compression * patch[2]
        if height % mh or width % mw:
            raise ValueError(f"frames of {height}×{width}: this {self.family} model needs height a multiple of "
                             f"{mh} and width a multiple of {mw}")


class WanBackbone(VideoBackbone):
    """Wan 2.1 text-to-video (``WanPipeline``, e.g. ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``).

    The VAE normalises latents per channel with ``latents_mean`` / ``latents_std`` (no scaling
    factor). The scheduler is UniPC on flow sigmas (or flow-match Euler): training uses the rectified
    flow ``x_σ = (1−σ)x0 + σε`` with target ``ε − x0`` and timestep ``1000·σ``.

    ``max_sequence_length``: UMT5 tokens (512, the pipeline's default when sampling).
    Two-expert Wan 2.2 pipelines (``transformer_2``) are refused: which expert a timestep trains
    would be a second model to align.
    """

    family = "wan"
    pipeline_class_name = "WanPipeline"
    denoiser_name = "transformer"
    lora_targets = UNET_LORA_TARGETS  # diffusers' Wan LoRA scripts: to_q/k/v/out.0 of self- and cross-attention
    max_sequence_length: int = 512

    def __init__(self, pipeline):
        if getattr(pipeline, "transformer_2", None) is not None:
            raise ValueError("two-expert Wan 2.2 pipelines (transformer_2) are not supported; use a single-"
                             "transformer Wan checkpoint")
        if pipeline.transformer is None:
            raise ValueError("this Wan pipeline has no transformer")
        super().__init__(pipeline)

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=torch.float32).view(shape)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=torch.float32).view(shape)
        return mean, std

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """``prompt_embeds [B, max_sequence_length, D]``: UMT5 states, zeroed past each prompt's tokens
        (as the pipeline does)."""
        embeds, _ = self.pipeline.encode_prompt(list(prompts), do_classifier_free_guidance=False,
                                                max_sequence_length=self.max_sequence_length, device=self.device)
        return Conditioning(embeds)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None,
                      chunk_size: int = 1) -> torch.Tensor:
        """Latents ``[B, C, F, h, w]`` of clips ``[B, 3, T, H, W]`` in [-1, 1] (images ``[B, 3, H, W]`` are
        one-frame clips), normalised as the pipeline does: ``(z − latents_mean) / latents_std``.

        ``sample=False`` takes the posterior mode (what Wan's video-to-video pipeline and caches use).
        """
        if pixels.ndim == 4:
            pixels = pixels.unsqueeze(2)
        self.check_num_frames(pixels.shape[2])
        out = []
        for chunk in pixels.split(chunk_size):
            dist = self.vae.encode(chunk.to(self.vae.device, self.vae.dtype)).latent_dist
            z = (dist.sample(generator) if sample else dist.mode()).float()
            mean, std = self._latent_stats(z)
            out.append((z - mean) / std)
        return torch.cat(out)

    def decode_latents(self, latents: torch.Tensor, *, chunk_size: int = 1, grad: bool = False) -> torch.Tensor:
        """Clips ``[B, 3, T, H, W]`` in [0, 1] (fp32) from latents ``[B, C, F, h, w]``."""
        out = []
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            for chunk in latents.split(chunk_size):
                mean, std = self._latent_stats(chunk)
                z = (chunk.float() * std + mean).to(self.vae.device, self.vae.dtype)
                out.append((self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Flow velocity ``[B, C, F, h, w]``; ``timesteps`` ``[B]`` is ``1000·σ``.

        Pipelines with ``expand_timesteps`` (Wan 2.2 TI2V) take one timestep per patch token: every
        token gets its row's timestep, as the text-to-video path of that pipeline does.
        """
        t = timesteps.to(x_t.device)
        if self.pipeline.config.get("expand_timesteps", False):
            p = self.raw_denoiser.config.patch_size
            tokens = (x_t.shape[2] // p[0]) * (x_t.shape[3] // p[1]) * (x_t.shape[4] // p[2])
            t = t[:, None].expand(-1, tokens)
        return self.denoiser(hidden_states=x_t, timestep=t,
                             encoder_hidden_states=cond.prompt_embeds.to(x_t.device, x_t.dtype), return_dict=False)[0]
