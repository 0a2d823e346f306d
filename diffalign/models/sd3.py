"""SD3: MMDiT transformer, flow matching, CLIP-L + CLIP-G (+ optional T5)."""

from __future__ import annotations

import torch

from diffalign.models.backbone import SD3_LORA_TARGETS, Backbone
from diffalign.models.base import Conditioning


class SD3Backbone(Backbone):
    """Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``).

    ``max_sequence_length``: T5 tokens (the pipeline's default 256; zeros of this length when the
    pipeline was loaded without T5, as the pipeline does).
    """

    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    lora_targets = SD3_LORA_TARGETS
    max_sequence_length: int = 256

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """``prompt_embeds [B, 77 + max_sequence_length, D_T5]`` (CLIP-L ‖ CLIP-G, padded to the T5 width,
        then T5) and ``pooled [B, D_L + D_G]``, as the pipeline computes them."""
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            list(prompts), None, None, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds, pooled)

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``timesteps`` is ``1000·σ`` (what the flow forward process gives)."""
        if cond.pooled is None:
            raise ValueError("SD3 needs the pooled text embedding (Conditioning.pooled)")
        return self.denoiser(hidden_states=x_t, timestep=timesteps,
                             encoder_hidden_states=cond.prompt_embeds.to(x_t.device, x_t.dtype),
                             pooled_projections=cond.pooled.to(x_t.device, x_t.dtype), return_dict=False)[0]
