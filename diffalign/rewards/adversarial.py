"""Adv-GRPO's adversarial reward model: a frozen vision foundation model's token features and a small trainable
head that tells reference images from generations (showlab/Adv-GRPO, ``train_dino`` /
``dino_patch_cotrain_score``; the losses are in :mod:`diffalign.objectives.adversarial`).

* :class:`VisionFeatures`: the frozen backbone. DINOv2 in the paper (transformers' ``Dinov2Model``; the original
  uses timm's ``vit_base_patch14_dinov2.lvd142m``, the same weights as ``facebook/dinov2-base``): images
  resized to ``image_size`` (518) bicubic, ImageNet mean/std, and ``last_hidden_state`` split into the CLS
  token ``[B, D]`` and the patch tokens ``[B, N, D]``. Any transformers vision transformer whose output starts
  with a CLS token works the same way (``CLIPVisionModel``: the Shapes world uses the bundled Shapes CLIP's
  vision tower as its small feature net).
* :class:`DiscriminatorHead`: ``Linear(D, 512) – GELU – Linear(512, 1)`` on one feature vector.
* :class:`AdversarialReward`: both, with ``logits`` (for training the head) and ``score`` (the GRPO reward
  ``0.7·D(cls) + 0.3·mean of 64 random patches``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.objectives.adversarial import discriminator_reward
from diffalign.rewards.base import Images, to_tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_ID = "facebook/dinov2-base"
BUNDLED = Path(__file__).resolve().parents[1] / "shapes" / "assets"


class VisionFeatures(nn.Module):
    """A frozen vision transformer: images ``[B, 3, H, W]`` in [0, 1] (or PIL images of any sizes) →
    ``(cls [B, D], patches [B, N, D])`` from ``last_hidden_state`` (fp32, no gradient)."""

    def __init__(self, model: nn.Module, image_size: int = 518, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike = DINO_ID, *, image_size: int | None = None,
                        mean=IMAGENET_MEAN, std=IMAGENET_STD, allow_pickle: bool = False) -> VisionFeatures:
        """Load a ``Dinov2Model`` (``model_type: dinov2``) or the vision tower of a CLIP checkpoint from a hub id
        or a local folder (``bundled:NAME`` = a model shipped in ``diffalign/shapes/assets``); weights from
        safetensors only unless ``allow_pickle``. ``image_size`` defaults to 518 for DINOv2 (the original's
        resize) and the model's own ``image_size`` otherwise."""
        from transformers import AutoConfig

        from diffalign.rewards.hf_clip import _from_pretrained

        src = str(source)
        if src.startswith("bundled:"):
            src = str(BUNDLED / src.split(":", 1)[1])
            if not Path(src).is_dir():
                raise FileNotFoundError(f"{source}: no bundled model at {src}")
        config = _from_pretrained(AutoConfig, src, "vision features", "config.json")
        kind = getattr(config, "model_type", "")
        if kind == "dinov2":
            from transformers import Dinov2Model as model_class
            default_size = 518
        elif kind in ("clip", "clip_vision_model"):
            from transformers import CLIPVisionModel as model_class
            default_size = None
        else:
            raise ValueError(f"{source}: vision features need a DINOv2 or CLIP checkpoint, got model_type {kind!r}")
        model, info = _from_pretrained(model_class, src, "vision features", "model.safetensors",
                                       allow_pickle=allow_pickle, output_loading_info=True)
        if info.get("missing_keys") or info.get("mismatched_keys"):
            raise KeyError(f"vision features ({source}): checkpoint does not match {model_class.__name__}: missing "
                           f"{sorted(info.get('missing_keys', []))[:8]}, mismatched {info.get('mismatched_keys', [])[:8]}")
        size = image_size or default_size or model.config.image_size
        return cls(model, size, mean, std)

    def preprocess(self, images: Images) -> torch.Tensor:
        """``[B, 3, S, S]`` normalised pixels: each image resized to ``image_size`` (bicubic, antialiased)."""
        if isinstance(images, torch.Tensor):
            batch = [to_tensor(images).float()]
        else:
            batch = [to_tensor([im]) for im in images]  # PIL images may differ in size
        size = (self.image_size, self.image_size)
        out = [F.interpolate(x.to(self.mean.device), size=size, mode="bicubic", antialias=True, align_corners=False)
               if tuple(x.shape[-2:]) != size else x.to(self.mean.device) for x in batch]
        return (torch.cat(out).clamp(0, 1) - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: Images) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.preprocess(images).to(self.model.dtype)
        kw = {"interpolate_pos_encoding": True} if "clip" in self.model.config.model_type else {}
        tokens = self.model(pixel_values=pixels, **kw).last_hidden_state.float()
        return tokens[:, 0], tokens[:, 1:]


class DiscriminatorHead(nn.Module):
    """``Linear(dim, hidden) – GELU – Linear(hidden, 1)``: one logit per feature vector ``[..., dim] → [...]``."""

    def __init__(self, dim: int, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).squeeze(-1)


def sample_patches(patches: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[B, min(n, N), D]``: patch tokens drawn per image uniformly with replacement (``torch.randint``, as the
    original) from ``patches`` ``[B, N, D]``."""
    b, num, d = patches.shape
    k = min(n, num)
    idx = torch.randint(0, num, (b, k), generator=generator).to(patches.device)
    return torch.gather(patches, 1, idx[..., None].expand(-1, -1, d))


class AdversarialReward(nn.Module):
    """The discriminator as a reward model: ``score(images, prompts) → [B]`` (prompts are unused: the head sees
    only image features), ``logits(images) → (cls [B], patches [B, n])`` with gradient to the head.

    Args:
        features: the frozen :class:`VisionFeatures`.
        head: the trainable :class:`DiscriminatorHead`.
        n_patches: patch tokens sampled per image (64).
        cls_weight: ``w_c`` of the reward (0.7); ``patch_weight`` of the loss is the trainer's.
        normalize_scored_features: L2-normalise the features before the head when scoring, as the original's
            ``dino_patch_cotrain_score`` does although the head is trained on unnormalised features (off).
    """

    name = "adversarial"
    differentiable = False

    def __init__(self, features: VisionFeatures, head: DiscriminatorHead, *, n_patches: int = 64,
                 cls_weight: float = 0.7, normalize_scored_features: bool = False):
        super().__init__()
        self.features, self.head = features, head
        self.n_patches, self.cls_weight, self.normalize = n_patches, cls_weight, normalize_scored_features
        self.generator: torch.Generator | None = None  # draws the scored patches when score() is given none

    def logits(self, images: Images, generator: torch.Generator | None = None, *, normalize: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cls, patches = self.features(images)
        if normalize:
            cls, patches = F.normalize(cls, dim=-1), F.normalize(patches, dim=-1)
        patch_logits = None
        if self.n_patches > 0 and patches.shape[1] > 0:
            patch_logits = self.head(sample_patches(patches, self.n_patches, generator))
        return self.head(cls), patch_logits

    @torch.no_grad()
    def score(self, images: Images, prompts=None, generator: torch.Generator | None = None) -> torch.Tensor:
        cls, patches = self.logits(images, generator or self.generator, normalize=self.normalize)
        return discriminator_reward(cls, patches, cls_weight=self.cls_weight).float()


__all__ = ["AdversarialReward", "DiscriminatorHead", "VisionFeatures", "sample_patches"]
