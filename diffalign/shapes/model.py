"""The bundled Shapes base model: a tiny Stable-Diffusion-architecture pipeline.

Every part is a stock diffusers / transformers component with a small config: ``AutoencoderKL``
(64x64 RGB -> 4x16x16 latents), ``CLIPTextModel`` (the Shapes word vocabulary, 2 layers, width 64),
``UNet2DConditionModel`` (cross-attention on the text states) and a DDIM scheduler. The saved folder
loads with plain ``StableDiffusionPipeline.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
BASE_MODEL_NAME = "shapes-sd-base"
REWARD_MODEL_NAME = "shapes-clip-reward"

LATENT_SIZE = 16  # 64x64 images, VAE downsamples by 4
# How the model is meant to be sampled (the README card records the ShapesEval measured with these).
DEFAULT_SAMPLING = {"num_inference_steps": 20, "guidance_scale": 5.0, "height": 64, "width": 64}

# The noise schedule of Stable Diffusion 1.x (scaled-linear betas, epsilon prediction, 1000 steps).
NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False}


def base_model_path() -> Path:
    """The bundled base model folder (``diffalign/shapes/assets/shapes-sd-base``)."""
    return ASSETS / BASE_MODEL_NAME


def reward_model_path() -> Path:
    """The bundled learned reward folder (``diffalign/shapes/assets/shapes-clip-reward``)."""
    return ASSETS / REWARD_MODEL_NAME


def make_vae() -> AutoencoderKL:
    """64x64x3 <-> 16x16x4: three encoder blocks (two downsamples), one resnet each."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64), layers_per_block=1, norm_num_groups=8,
        mid_block_add_attention=False,
    )


def make_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A 2-layer CLIP text transformer of width 64 over the Shapes vocabulary."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=64,
    )
    return CLIPTextModel(config)


def make_unet() -> UNet2DConditionModel:
    """A small SD UNet on 16x16 latents: cross-attention at 16x16 and 8x8, plain resnets at 4x4."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 128),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=16,
    )


def make_train_scheduler() -> DDPMScheduler:
    """The forward process used in pretraining."""
    return DDPMScheduler(**NOISE_SCHEDULE)


def make_sampling_scheduler() -> DDIMScheduler:
    """The scheduler saved with the pipeline: DDIM on the same noise schedule (SD 1.x settings)."""
    return DDIMScheduler(**NOISE_SCHEDULE, set_alpha_to_one=False, steps_offset=1)


def assemble_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                      unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """Put the parts together as a standard ``StableDiffusionPipeline`` (no safety checker)."""
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=make_sampling_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
