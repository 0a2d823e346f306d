"""Rewards on a transformers ``CLIPModel``: PickScore, CLIPScore (three explicit variants), and the
bundled Shapes CLIP (PickScore convention).

All of them compute L2-normalised image and text features ``î, t̂`` (``get_image_features`` /
``get_text_features``) and a per-pair cosine ``cos = î · t̂``; they differ in the backbone, the
preprocessing (:class:`~diffalign.rewards.preprocess.ImageTransform`), a text prefix and the
final scale.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from diffalign.rewards.base import Images, Mode, RewardModel
from diffalign.rewards.loading import missing_weights
from diffalign.rewards.preprocess import ImageTransform, from_hf_processor

PICKSCORE_ID = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR_ID = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIPSCORE_VARIANTS = ("hessel", "torchmetrics", "raw")


def _features(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


PICKLED_WEIGHT_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def _from_pretrained(cls, source: str | os.PathLike, what: str, filename: str,
                     allow_pickle: bool | None = None, **kw):
    """``cls.from_pretrained(source)``; a local path that does not exist, or a hub id that cannot be
    reached, becomes a :class:`MissingWeightsError` naming ``filename``. For a model (``allow_pickle`` not
    None) weights load from safetensors only (``use_safetensors=True``) unless ``allow_pickle``: a folder
    or hub repo with only pickled weights is a ``PickledWeightsError`` naming ``--allow-pickle``."""
    from diffalign.rewards.loading import pickled_reward_error

    src = str(source)
    local = os.path.isabs(src) or src.startswith(".") or os.path.exists(src)
    if local and not os.path.isdir(src):
        raise missing_weights(what, filename, None, url=src, cause=FileNotFoundError(src))
    if allow_pickle is not None:
        kw["use_safetensors"] = None if allow_pickle else True
        if not allow_pickle and local and any(os.path.isfile(os.path.join(src, f)) for f in PICKLED_WEIGHT_FILES) \
                and not any(f.endswith(".safetensors") for f in os.listdir(src)):
            raise pickled_reward_error(src, f"{what} model (pytorch_model.bin)")
    try:
        return cls.from_pretrained(src, **kw)
    except Exception as e:  # offline / not found: OSError or huggingface_hub errors
        if allow_pickle is False and ".safetensors" in str(e) and not local:
            raise pickled_reward_error(src, f"{what} model (no .safetensors in the hub repo)") from None
        if not (isinstance(e, OSError) or type(e).__module__.startswith("huggingface_hub")):
            raise
        raise missing_weights(what, filename, None if local else src, url=src, cause=e) from e


def check_loading_info(info: dict, what: str) -> None:
    """Fail on keys ``from_pretrained`` would silently initialise at random (missing or mismatched);
    unexpected keys are allowed only for the ``position_ids`` buffers older transformers saved."""
    missing = list(info.get("missing_keys", []))
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", [])]
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.endswith("position_ids")]
    if missing or mismatched or unexpected:
        raise KeyError(f"{what}: checkpoint does not match the model: missing {sorted(missing)[:8]}, "
                       f"mismatched {sorted(mismatched)[:8]}, unexpected {sorted(unexpected)[:8]}")


class CLIPReward(RewardModel):
    """``scale · cos(î, t̂)`` on a transformers ``CLIPModel`` (optionally clamped at 0).

    Args:
        model: the ``CLIPModel``.
        tokenizer: its tokenizer (padding and truncation to ``max_length`` tokens).
        transform: the image preprocessing.
        scale: a float, or "logit_scale" for ``model.logit_scale.exp()`` (PickScore).
        clamp_min: clamp each score at this value (Hessel's ``max(cos, 0)``), or None.
        prefix: prepended to every prompt (Hessel's "A photo depicts ").
    """

    def __init__(self, model, tokenizer, transform: ImageTransform, scale: float | str = 1.0,
                 clamp_min: float | None = None, prefix: str = "", max_length: int | None = None,
                 mode: Mode = "exact", batch_size: int = 32, dtype: torch.dtype = torch.float32):
        super().__init__(mode=mode, batch_size=batch_size)
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.tokenizer, self.transform = tokenizer, transform
        self.scale, self.clamp_min, self.prefix = scale, clamp_min, prefix
        positions = model.config.text_config.max_position_embeddings
        self.max_length = min(max_length or positions, positions, tokenizer.model_max_length)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text features ``[B, D]``."""
        tok = self.tokenizer([self.prefix + p for p in prompts], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt").to(self.device)
        t = _features(self.model.get_text_features(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]))
        return t / t.norm(dim=-1, keepdim=True)

    def encode_image(self, images: Images) -> torch.Tensor:
        """L2-normalised image features ``[B, D]`` after the mode's preprocessing."""
        pixels = self.transform(images, self.mode).to(self.device, next(self.model.parameters()).dtype)
        i = _features(self.model.get_image_features(pixel_values=pixels))
        return i / i.norm(dim=-1, keepdim=True)

    def _score(self, images: Images, prompts: list[str]) -> torch.Tensor:
        cos = (self.encode_image(images) * self.encode_text(prompts)).sum(-1)
        scale = self.model.logit_scale.exp() if self.scale == "logit_scale" else self.scale
        s = scale * cos
        return s.clamp(min=self.clamp_min) if self.clamp_min is not None else s


def load_hf_clip(weights: str | os.PathLike, processor: str | os.PathLike | None, what: str,
                 allow_pickle: bool = False):
    """``(CLIPModel, tokenizer, CLIPImageProcessor)`` from a hub id or a local folder (processor
    files from ``processor`` when given, else from ``weights``); the model from safetensors only unless
    ``allow_pickle``."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model, info = _from_pretrained(CLIPModel, weights, what, "model.safetensors", allow_pickle=allow_pickle,
                                   output_loading_info=True)
    check_loading_info(info, f"{what} ({weights})")
    src = processor or weights
    tokenizer = _from_pretrained(AutoTokenizer, src, what, "tokenizer files")
    image_processor = _from_pretrained(CLIPImageProcessor, src, what, "preprocessor_config.json")
    return model, tokenizer, image_processor


class PickScore(CLIPReward):
    """PickScore: ``logit_scale.exp() · cos`` (≈ 20–23 on real images; softmax over images gives
    preference probabilities). HF ``CLIPModel`` ``yuvalkirstain/PickScore_v1`` with the
    ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor (shortest side 224 bicubic, HF center crop
    224, OpenAI mean/std; text padded and truncated at 77 tokens)."""

    name = "pickscore"

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None, processor: str | os.PathLike | None = None,
                        allow_pickle: bool = False, **kw) -> PickScore:
        """``weights``: hub id or folder of the CLIPModel; ``processor``: hub id or folder of the
        processor (default: ``weights`` if it is a folder with a ``preprocessor_config.json``, else
        the laion CLIP-H processor)."""
        weights = weights or PICKSCORE_ID
        if processor is None:
            processor = weights if os.path.isdir(str(weights)) else PICKSCORE_PROCESSOR_ID
        model, tok, proc = load_hf_clip(weights, processor, "PickScore", allow_pickle)
        return cls(model, tok, from_hf_processor(proc), scale="logit_scale", **kw)


_CLIPSCORE_DEFAULTS = {
    # variant: (backbone, scale, clamp_min, prefix, crop rounding of the reference code)
    "hessel": ("openai/clip-vit-base-patch32", 2.5, 0.0, "A photo depicts ", "torchvision"),
    "torchmetrics": ("openai/clip-vit-large-patch14", 100.0, None, "", "hf"),
    "raw": ("openai/clip-vit-large-patch14", 1.0, None, "", "hf"),
}


class CLIPScore(CLIPReward):
    """CLIPScore with an explicit variant (they are not interchangeable):

    - ``hessel``: ``2.5 · max(cos, 0)`` per image, OpenAI ViT-B/32, prompts prefixed with
      "A photo depicts " (jmhessel/clipscore; range [0, 2.5], typically 0.5–1.0);
    - ``torchmetrics``: ``100 · cos`` per image, ViT-L/14 (``torchmetrics.multimodal.CLIPScore``;
      its reported number is :meth:`aggregate` = ``max(mean, 0)`` over the set; SD ≈ 26–33);
    - ``raw``: ``cos`` in [-1, 1].
    """

    name = "clipscore"

    def __init__(self, *args, variant: str, **kw):
        super().__init__(*args, **kw)
        self.variant = variant

    @classmethod
    def from_pretrained(cls, variant: str | None = None, weights: str | os.PathLike | None = None,
                        processor: str | os.PathLike | None = None, allow_pickle: bool = False, **kw) -> CLIPScore:
        if variant not in CLIPSCORE_VARIANTS:
            raise ValueError(f"CLIPScore needs an explicit variant, one of {CLIPSCORE_VARIANTS} "
                             f"(got {variant!r}); their scales differ (2.5·max(cos,0), 100·cos, cos)")
        backbone, scale, clamp_min, prefix, rounding = _CLIPSCORE_DEFAULTS[variant]
        model, tok, proc = load_hf_clip(weights or backbone, processor, f"CLIPScore ({variant})", allow_pickle)
        t = from_hf_processor(proc)
        t = ImageTransform("shortest", t.size, t.crop_size, t.mean, t.std, crop_rounding=rounding)
        out = cls(model, tok, t, scale=scale, clamp_min=clamp_min, prefix=prefix, variant=variant, **kw)
        out.name = f"clipscore-{variant}"
        return out

    def aggregate(self, scores: torch.Tensor) -> torch.Tensor:
        """The set-level number of the variant: ``max(mean, 0)`` for torchmetrics, else the mean."""
        m = scores.float().mean()
        return m.clamp(min=0) if self.variant == "torchmetrics" else m
