"""Tiny random-weight pipelines of the real architectures, saved as diffusers folders.

Tests load them with the same ``from_pretrained`` code path a hub id takes. Everything is built
locally (the tokenizer too), so no network is needed. Images are 32×32.
"""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ("a", "photo", "of", "yellow", "disc", "cat", "red", "hat", "tie", "blue", "square", "and", "the", "dog")


def _tokenizer(folder: Path):
    from diffalign.shapes.tokenizer import build_tokenizer

    return build_tokenizer(folder, WORDS)


def _clip_text(cls, tokenizer, hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, projection_dim=projection or hidden)
    return cls(config)


def _vae(latent_channels: int = 4, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32, **extra)


def make_tiny_sd(path: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A tiny SD1.x-architecture pipeline (UNet with cross-attention, VAE, CLIP text encoder)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    tok = _tokenizer(path / "_tok")
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_clip_text(CLIPTextModel, tok), tokenizer=tok, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def make_tiny_sdxl(path: str | Path, seed: int = 0) -> Path:
    """A tiny SDXL-architecture pipeline (two text encoders, pooled embeds, text_time micro-conditioning)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    tok = _tokenizer(path / "_tok")
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 32,
                                cross_attention_dim=64, norm_num_groups=8)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip_text(CLIPTextModel, tok), tokenizer=tok,
                                     text_encoder_2=_clip_text(CLIPTextModelWithProjection, tok), tokenizer_2=tok,
                                     unet=unet, scheduler=sched)
    pipe.save_pretrained(path)
    return path


def make_tiny_sd3(path: str | Path, seed: int = 0) -> Path:
    """A tiny SD3-architecture pipeline (MMDiT, flow matching, CLIP-L + CLIP-G; no T5, as the pipeline allows)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    tok = _tokenizer(path / "_tok")
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                                        pooled_projection_dim=64, out_channels=4)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(shift_factor=0.06, scaling_factor=1.5),
                                    text_encoder=_clip_text(CLIPTextModelWithProjection, tok), tokenizer=tok,
                                    text_encoder_2=_clip_text(CLIPTextModelWithProjection, tok), tokenizer_2=tok,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(path)
    return path
