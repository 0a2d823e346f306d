"""SD1.x / SD2.x: one CLIP text encoder, UNet, epsilon or v_prediction."""

from __future__ import annotations

import torch

from diffalign.models.backbone import Backbone
from diffalign.models.base import Conditioning


class SDBackbone(Backbone):
    """Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``)."""

    family = "sd"
    pipeline_class_name = "StableDiffusionPipeline"

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """``prompt_embeds [B, L, D]`` (``L`` = the tokenizer's max length, 77 for real models): the text
        encoder's last hidden states, as the pipeline gives them."""
        embeds, _ = self.pipeline.encode_prompt(list(prompts), self.device, 1, False)
        return Conditioning(embeds)

    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return self.denoiser(x_t, timesteps, encoder_hidden_states=cond.prompt_embeds.to(x_t.device, x_t.dtype)).sample
