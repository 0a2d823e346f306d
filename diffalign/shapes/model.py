"""The bundled Shapes base models: a tiny Stable-Diffusion-architecture pipeline and a tiny SD3 one.

Every part is a stock diffusers / transformers component with a small config: ``AutoencoderKL``
(64x64 RGB -> 4x16x16 latents), ``CLIPTextModel`` (the Shapes word vocabulary, 2 layers, width 64),
``UNet2DConditionModel`` (cross-attention on the text states) and a DDIM scheduler. The saved folder
loads with plain ``StableDiffusionPipeline.from_pretrained``.

The flow-matching base (``shapes-sd3-base``, for the flow methods) shares the VAE and the tokenizer and
has two ``CLIPTextModelWithProjection`` encoders, an ``SD3Transformer2DModel`` (MMDiT, patch 2) and a
``FlowMatchEulerDiscreteScheduler``; it loads with ``StableDiffusion3Pipeline.from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

ASSETS = Path(__file__).resolve().parent / "assets"
BASE_MODEL_NAME = "shapes-sd-base"
FLOW_BASE_MODEL_NAME = "shapes-sd3-base"
REWARD_MODEL_NAME = "shapes-clip-reward"
PICKSCORE_MODEL_NAME = "shapes-pickscore"

LATENT_SIZE = 16  # 64x64 images, VAE downsamples by 4
# How the model is meant to be sampled (the README card records the ShapesEval measured with these).
DEFAULT_SAMPLING = {"num_inference_steps": 20, "guidance_scale": 5.0, "height": 64, "width": 64}
# How the flow-matching base is meant to be sampled: Flow-GRPO's 10 steps and CFG 4.5 (its card records
# the ShapesEval measured with these; the Euler schedule of the saved scheduler, shift 1).
FLOW_DEFAULT_SAMPLING = {"num_inference_steps": 10, "guidance_scale": 4.5, "height": 64, "width": 64}

# The noise schedule of Stable Diffusion 1.x (scaled-linear betas, epsilon prediction, 1000 steps).
NOISE_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False}


def base_model_path() -> Path:
    """The bundled base model folder (``diffalign/shapes/assets/shapes-sd-base``)."""
    return ASSETS / BASE_MODEL_NAME


def flow_base_model_path() -> Path:
    """The bundled flow-matching base folder (``diffalign/shapes/assets/shapes-sd3-base``)."""
    return ASSETS / FLOW_BASE_MODEL_NAME


def reward_model_path() -> Path:
    """The bundled learned reward folder (``diffalign/shapes/assets/shapes-clip-reward``)."""
    return ASSETS / REWARD_MODEL_NAME


def pickscore_model_path() -> Path:
    """The bundled preference-tuned reward folder (``diffalign/shapes/assets/shapes-pickscore``)."""
    return ASSETS / PICKSCORE_MODEL_NAME


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


# ---------------------------------------------------------------- the flow-matching (SD3-architecture) base

FLOW_SHIFT = 1.0
"""The sampling scheduler's ``shift``: none at 16x16 latents (SD3's 3.0 is for 128x128 latents)."""


def make_flow_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModelWithProjection:
    """One of the two text encoders: a 2-layer CLIP text transformer of width 64, pooled projection 64.

    The pipeline concatenates the two encoders' states (64 + 64 = the transformer's ``joint_attention_dim``
    128, so no padding) and their pooled projections (128 = ``pooled_projection_dim``)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=64,
    )
    return CLIPTextModelWithProjection(config)


def make_flow_transformer() -> SD3Transformer2DModel:
    """A 6-layer MMDiT (4 heads of 32, width 128) on 16x16x4 latents in 2x2 patches (64 image tokens)."""
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=4, out_channels=4, num_layers=6,
        attention_head_dim=32, num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128,
        pooled_projection_dim=128, pos_embed_max_size=16,
    )


def make_flow_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Rectified flow, Euler sampling, :data:`FLOW_SHIFT`."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=FLOW_SHIFT)


def assemble_flow_pipeline(vae: AutoencoderKL, text_encoder: CLIPTextModelWithProjection,
                           text_encoder_2: CLIPTextModelWithProjection, tokenizer: CLIPTokenizer,
                           transformer: SD3Transformer2DModel) -> StableDiffusion3Pipeline:
    """A standard ``StableDiffusion3Pipeline`` without T5 (the pipeline then feeds zeros in its place)."""
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=make_flow_scheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=None,
        tokenizer_3=None,
    )
