"""ImageReward (THUDM): BLIP ViT-L/16 + BERT with cross-attention + an affine MLP head.

Rebuilt on transformers' ``BlipForImageTextRetrieval`` (vision model + text encoder with
cross-attention); the original ``ImageReward.pt`` state dict is remapped key by key (no reshapes)
and loaded strictly. Score::

    f = text_encoder(prompt ids, cross-attending to vision tokens).last_hidden_state[:, 0]   # [CLS]
    r = mlp(f);  reward = (r − 0.16717362830052426) / 1.0333394966054072                    # ≈ N(0, 1)

Prompts are padded and truncated to 35 BERT tokens. The ``[DEC]``/``[ENC]`` tokens the original
adds to the tokenizer are never used on the scoring path, so a plain ``bert-base-uncased``
tokenizer gives the same ids.
"""

from __future__ import annotations

import os
import re

import torch

from diffalign.rewards.base import Images, Mode, RewardModel
from diffalign.rewards.loading import load_state_dict_file, load_strict, resolve_file
from diffalign.rewards.open_clip_rewards import AestheticHead
from diffalign.rewards.preprocess import ImageTransform

HUB_ID = "THUDM/ImageReward"
FILENAME = "ImageReward.pt"
MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_LENGTH = 35
BLIP_CONFIG = {  # BLIP ViT-L/16 at 224 px + BERT-base MED (med_config.json), as ImageReward builds them
    "vision_config": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                          patch_size=16, image_size=224, layer_norm_eps=1e-6),
    "text_config": dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, encoder_hidden_size=1024, max_position_embeddings=512,
                        layer_norm_eps=1e-12),
    "image_text_hidden_size": 256,
}
_VISION_RULES = [  # original -> transformers, applied to keys under blip.visual_encoder.
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def convert_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``ImageReward.pt`` keys -> ``(BlipForImageTextRetrieval state dict, MLP head state dict)``.
    Keys that match no rule are kept as they are, so a strict load reports them."""
    blip, mlp = {}, {}
    for key, value in sd.items():
        if key.startswith("mlp."):
            mlp[key[len("mlp."):]] = value
        elif key == "blip.text_encoder.embeddings.position_ids":
            continue  # a buffer transformers 5 does not persist
        elif key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            for pattern, repl in _VISION_RULES:
                if re.match(pattern, rest):
                    rest = re.sub(pattern, repl, rest)
                    break
            blip["vision_model." + rest] = value
        elif key.startswith("blip."):
            blip[key[len("blip."):]] = value
        else:
            blip[key] = value
    return blip, mlp


class ImageReward(RewardModel):
    """ImageReward: z-normalised reward (≈ N(0, 1) on SD1.4 images; 62 % in [−1, 1]).

    Preprocessing: Resize(224, bicubic) + CenterCrop(224) (torchvision), OpenAI mean/std.
    """

    name = "imagereward"

    def __init__(self, blip, head: AestheticHead, tokenizer, transform: ImageTransform | None = None,
                 mode: Mode = "exact", batch_size: int = 16, dtype: torch.dtype = torch.float32):
        super().__init__(mode=mode, batch_size=batch_size)
        self.blip = blip.to(dtype).eval().requires_grad_(False)
        self.head = head.to(dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.transform = transform or ImageTransform("shortest", blip.config.vision_config.image_size)

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                        blip_config: dict | None = None, allow_pickle: bool = False, **kw) -> ImageReward:
        """``weights``: ``ImageReward.pt`` (file, folder or hub id; default ``THUDM/ImageReward``);
        ``tokenizer``: a BERT tokenizer folder or hub id (default: ``weights`` if it is a folder with a
        ``vocab.txt``, else ``bert-base-uncased``); ``blip_config``: overrides of :data:`BLIP_CONFIG`.
        The original ``ImageReward.pt`` is pickled: it loads (``torch.load(weights_only=True)``) only with
        ``allow_pickle=True`` (``--allow-pickle``); a ``.safetensors`` of the same state dict loads without."""
        from transformers import BertTokenizer, BlipConfig, BlipForImageTextRetrieval

        path = resolve_file(weights, FILENAME, HUB_ID, what="ImageReward")
        cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in BLIP_CONFIG.items()}
        for k, v in (blip_config or {}).items():
            cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
        blip_sd, mlp_sd = convert_state_dict(load_state_dict_file(path, allow_pickle=allow_pickle))
        blip = BlipForImageTextRetrieval(BlipConfig(**cfg))
        load_strict(blip, blip_sd, f"ImageReward BLIP ({path.name})", ignore=("itm_head.weight", "itm_head.bias"))
        head = AestheticHead(cfg["text_config"]["hidden_size"])
        load_strict(head, mlp_sd, f"ImageReward MLP ({path.name})")
        if tokenizer is None:
            tokenizer = path.parent if (path.parent / "vocab.txt").is_file() else "bert-base-uncased"
        from diffalign.rewards.hf_clip import _from_pretrained

        tok = _from_pretrained(BertTokenizer, tokenizer, "ImageReward tokenizer", "vocab.txt")
        return cls(blip, head, tok, **kw)

    def _score(self, images: Images, prompts: list[str]) -> torch.Tensor:
        dtype = next(self.blip.parameters()).dtype
        pixels = self.transform(images, self.mode).to(self.device, dtype)
        image_embeds = self.blip.vision_model(pixel_values=pixels).last_hidden_state
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_LENGTH,
                              return_tensors="pt").to(self.device)
        attn = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.blip.text_encoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                                     encoder_hidden_states=image_embeds, encoder_attention_mask=attn)
        r = self.head(out.last_hidden_state[:, 0, :])
        return (r - MEAN) / STD
