"""Tiny random-weight pipelines of the real architectures, saved as diffusers folders.

Tests load them with the same ``from_pretrained`` code path a hub id takes. Everything is built
locally (the tokenizers too), so no network is needed. Images are 32×32 (latents 4×16×16); each
build takes well under a second on a CPU. Weights are fixed by ``seed``.

Usage::

    from diffalign import testing
    from diffalign.models import load_backbone

    backbone = load_backbone(testing.make_tiny_sdxl(tmp_path / "sdxl"))
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

WORDS = ("a", "photo", "of", "yellow", "disc", "cat", "red", "hat", "tie", "blue", "square", "and", "the", "dog")


def _tokenizer():
    """A word-level ``CLIPTokenizer`` built in a temporary folder (the pipeline saves its own copy)."""
    from diffalign.shapes.tokenizer import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return build_tokenizer(Path(tmp), WORDS)


def _t5_tokenizer():
    """A tiny unigram ``T5TokenizerFast`` (one piece per word in :data:`WORDS`, characters otherwise)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    specials = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces = [("\u2581" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"]
    backend = Tokenizer(models.Unigram(specials + pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                          special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=32)


def _clip_text(cls, tokenizer, hidden: int = 32, projection: int | None = None):
    from transformers import CLIPTextConfig

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=tokenizer.model_max_length,
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
    tok = _tokenizer()
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
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    tok = _tokenizer()
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


def make_tiny_sd3(path: str | Path, with_t5: bool = False, seed: int = 0, sd35: bool = False) -> Path:
    """A tiny SD3-architecture pipeline (MMDiT, flow matching, CLIP-L + CLIP-G, and a tiny T5 encoder
    with its tokenizer if ``with_t5``; without it the folder has no T5, as the pipeline allows). ``sd35``:
    SD3.5's transformer options, RMS qk-norm in every attention and MMDiT-X dual attention (a second
    image self-attention) in the first block, as SD3.5 Medium's config has them."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    tok = _tokenizer()
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=64,
                                        pooled_projection_dim=64, out_channels=4,
                                        **({"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}))
    t5 = None
    if with_t5:  # d_model = the transformer's joint_attention_dim, as SD3's T5-XXL (4096) is
        t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=4,
                                     relative_attention_num_buckets=8, decoder_start_token_id=0))
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=_vae(shift_factor=0.06, scaling_factor=1.5),
                                    text_encoder=_clip_text(CLIPTextModelWithProjection, tok), tokenizer=tok,
                                    text_encoder_2=_clip_text(CLIPTextModelWithProjection, tok), tokenizer_2=tok,
                                    text_encoder_3=t5, tokenizer_3=_t5_tokenizer() if with_t5 else None)
    pipe.save_pretrained(path)
    return path


def make_tiny_wan(path: str | Path, seed: int = 0, flow_shift: float = 3.0) -> Path:
    """A tiny Wan 2.1-architecture text-to-video pipeline: causal 3-D VAE (4× time, 8× space, 4 latent
    channels with non-trivial ``latents_mean``/``latents_std``), a 2-layer ``WanTransformer3DModel``
    (patch 1×2×2), a tiny UMT5 encoder, and UniPC on flow sigmas as the released Wan 2.1 models ship.
    Clips of 17×32×32 give latents ``[4, 5, 4, 4]``."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.05, 0.0],
                           latents_std=[1.5, 0.8, 1.2, 1.0])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    t5 = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4,
                                     relative_attention_num_buckets=8, decoder_start_token_id=0))
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift)
    pipe = WanPipeline(tokenizer=_t5_tokenizer(), text_encoder=t5, vae=vae, scheduler=sched, transformer=transformer)
    pipe.save_pretrained(path)
    return path


QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
"""Qwen3's chat template reduced to what Z-Image's pipeline uses (one user turn, ``enable_thinking``)."""

QWEN_IMAGE_SYSTEM = ("system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
                     "relationships of the objects and background:\nuser\nassistant\n")


def _qwen_tokenizer():
    """A tiny byte-level BPE ``Qwen2Tokenizer`` (Qwen's pre-tokenizer and special tokens), trained here on
    Qwen-Image's prompt template and :data:`WORDS` so that each of their words is one token: the template
    prefix is 34 tokens, as with the real tokenizer (the pipeline drops exactly 34). Other text falls back
    to bytes. Carries :data:`QWEN_CHAT_TEMPLATE`."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<think>", "</think>"]
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([QWEN_IMAGE_SYSTEM, " ".join(WORDS), " " + " ".join(WORDS)] * 4, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         additional_special_tokens=specials[1:])
    tok.chat_template = QWEN_CHAT_TEMPLATE
    return tok


def make_tiny_qwen_image(path: str | Path, seed: int = 0) -> Path:
    """A tiny Qwen-Image-architecture pipeline, built like diffusers' own ``QwenImagePipeline`` tests: a
    2-layer ``QwenImageTransformer2DModel`` (2×2 packing, so ``in_channels`` 16 for 4 latent channels), a
    causal 3-D ``AutoencoderKLQwenImage`` (2× spatial, non-trivial ``latents_mean``/``latents_std``), a tiny
    ``Qwen2_5_VLForConditionalGeneration`` text encoder, and Qwen-Image's released scheduler config (dynamic
    shifting; flow_frontier.md §10.2). Images of 32×32 give latents ``[4, 16, 16]``, 64 image tokens."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path = Path(path)
    torch.manual_seed(seed)
    tok = _qwen_tokenizer()
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=3, joint_attention_dim=16,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=12, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                 latents_mean=[0.1, -0.2, 0.05, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0])
    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "num_key_value_heads": 2, "vocab_size": len(tok), "rope_theta": 1000000.0,
                     "bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        hidden_size=16, vocab_size=len(tok), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"), image_token_id=ids("<|image_pad|>"),
        vision_token_id=ids("<|image_pad|>"))
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    sched = FlowMatchEulerDiscreteScheduler(base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
                                            max_image_seq_len=8192, shift=1.0, shift_terminal=0.02,
                                            use_dynamic_shifting=True, time_shift_type="exponential")
    pipe = QwenImagePipeline(scheduler=sched, vae=vae, text_encoder=text_encoder, tokenizer=tok,
                             transformer=transformer)
    pipe.save_pretrained(path)
    return path


def make_tiny_z_image(path: str | Path, seed: int = 0) -> Path:
    """A tiny Z-Image-architecture pipeline, built like diffusers' own ``ZImagePipeline`` tests: a 2-layer
    ``ZImageTransformer2DModel`` (patch 2, 16 latent channels), a 16-channel ``AutoencoderKL`` with Z-Image's
    ``shift_factor``/``scaling_factor`` (0.1159 / 0.3611), a tiny ``Qwen3Model`` text encoder with a chat
    template, and a static shift of 3.0 (Z-Image-Turbo's scheduler config, from memory). Images of 32×32
    give latents ``[16, 16, 16]``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    path = Path(path)
    torch.manual_seed(seed)
    tok = _qwen_tokenizer()
    transformer = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
                                           n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5,
                                           qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
                                           axes_dims=[8, 4, 4], axes_lens=[256, 32, 32])
    with torch.no_grad():  # allocated with torch.empty (diffusers' tests fix them the same way)
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    text_encoder = Qwen3Model(Qwen3Config(hidden_size=16, intermediate_size=16, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                                          vocab_size=len(tok), max_position_embeddings=512,
                                          bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id))
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                          vae=_vae(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611),
                          text_encoder=text_encoder, tokenizer=tok, transformer=transformer)
    pipe.save_pretrained(path)
    return path


def make_tiny_flux(path: str | Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """A tiny FLUX.1-architecture pipeline, built like diffusers' own ``FluxPipeline`` tests: a
    ``FluxTransformer2DModel`` of one double-stream and one single-stream block (2×2 packing, so ``in_channels`` 64
    for 16 latent channels) with the guidance embedding of FLUX.1-dev (``guidance_embeds=False``: schnell), a
    16-channel ``AutoencoderKL`` without quant convolutions and with FLUX's ``shift_factor``/``scaling_factor``
    (0.1159 / 0.3611), a tiny CLIP text model (pooled output) and a tiny T5 encoder, and FLUX.1-dev's scheduler
    config (shift 3.0 with dynamic shifting, μ bounds 0.5 / 1.15 over 256 / 4096 tokens; from memory). Images of
    32×32 give latents ``[16, 16, 16]``, 64 image tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5Config, T5EncoderModel

    path = Path(path)
    torch.manual_seed(seed)
    tok = _tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=guidance_embeds,
                                         axes_dims_rope=(4, 4, 8))
    t5 = T5EncoderModel(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=4,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=_vae(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611,
                                                  use_quant_conv=False, use_post_quant_conv=False),
                        text_encoder=_clip_text(CLIPTextModel, tok), tokenizer=tok, text_encoder_2=t5,
                        tokenizer_2=_t5_tokenizer(), transformer=transformer)
    pipe.save_pretrained(path)
    return path


def make_tiny_dinov2(path: str | Path, seed: int = 0) -> Path:
    """A tiny random ``Dinov2Model`` (2 layers, hidden 32, patch 8, image size 32: 16 patch tokens + CLS) saved
    as safetensors, with its ``model_type: dinov2`` config: Adv-GRPO's feature net on a CPU."""
    from transformers import Dinov2Config, Dinov2Model

    path = Path(path)
    torch.manual_seed(seed)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=8, image_size=32)).save_pretrained(path, safe_serialization=True)
    return path
