"""SDXL: two CLIP text encoders, a pooled embedding and size/crop micro-conditioning."""

from __future__ import annotations

import dataclasses

import torch

from diffalign.models.backbone import Backbone
from diffalign.models.base import Conditioning


class SDXLBackbone(Backbone):
    """Stable Diffusion XL (``StableDiffusionXLPipeline``)."""

    family = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """``prompt_embeds [B, 77, D1+D2]`` (penultimate states of both encoders, concatenated) and
        ``pooled [B, D2]`` (encoder 2's projection), exactly as the pipeline computes them.
        ``time_ids`` is left empty: attach it with :meth:`with_time_ids`."""
        embeds, _, pooled, _ = self.pipeline.encode_prompt(list(prompts), device=self.device,
                                                            num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Conditioning(embeds, pooled)

    @staticmethod
    def time_ids(original_sizes: torch.Tensor, crops_top_left: torch.Tensor,
                 target_size: tuple[int, int]) -> torch.Tensor:
        """``[B, 6]`` = (original h, w, crop top, crop left, target h, w), SDXL's ``add_time_ids``.

        Args:
            original_sizes: ``[B, 2]`` each image's true (h, w) before resizing and cropping.
            crops_top_left: ``[B, 2]`` (top, left) of the crop in the resized image.
            target_size: (h, w) of the training images.
        """
        original_sizes, crops_top_left = torch.as_tensor(original_sizes), torch.as_tensor(crops_top_left)
        if original_sizes.shape != crops_top_left.shape or original_sizes.shape[-1] != 2:
            raise ValueError(f"original_sizes {tuple(original_sizes.shape)} and crops_top_left "
                             f"{tuple(crops_top_left.shape)} must both be [B, 2]")
        target = torch.tensor(target_size, dtype=torch.float32).expand(len(original_sizes), 2)
        return torch.cat([original_sizes.float(), crops_top_left.float(), target], dim=1)

    def with_time_ids(self, cond: Conditioning, original_sizes: torch.Tensor, crops_top_left: torch.Tensor,
                      target_size: tuple[int, int]) -> Conditioning:
        """A copy of ``cond`` with :meth:`time_ids` attached (on the embeddings' device)."""
        ids = self.time_ids(original_sizes, crops_top_left, target_size).to(cond.prompt_embeds.device)
        return dataclasses.replace(cond, time_ids=ids)

    def default_time_ids(self, x_t: torch.Tensor) -> torch.Tensor:
        """The pipeline's inference default for latents ``x_t``: original = target = image size, no crop."""
        f = self.pipeline.vae_scale_factor
        size = (x_t.shape[-2] * f, x_t.shape[-1] * f)
        n = len(x_t)
        return self.time_ids(torch.tensor([size] * n), torch.zeros(n, 2), size)

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Without ``cond.time_ids`` the inference default (:meth:`default_time_ids`) is used."""
        time_ids = cond.time_ids if cond.time_ids is not None else self.default_time_ids(x_t)
        if cond.pooled is None:
            raise ValueError("SDXL needs the pooled text embedding (Conditioning.pooled)")
        added = {"text_embeds": cond.pooled.to(x_t.device, x_t.dtype), "time_ids": time_ids.to(x_t.device, x_t.dtype)}
        return self.denoiser(x_t, timesteps, encoder_hidden_states=cond.prompt_embeds.to(x_t.device, x_t.dtype),
                             added_cond_kwargs=added).sample
