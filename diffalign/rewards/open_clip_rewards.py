"""Rewards on open_clip models: HPSv2 / HPSv2.1 and the LAION aesthetic predictor v2."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from diffalign.rewards.base import Images, Mode, RewardModel
from diffalign.rewards.loading import (
    load_state_dict_file,
    load_strict,
    missing_weights,
    pickled_reward_error,
    resolve_file,
)
from diffalign.rewards.preprocess import ImageTransform

HPS_HUB_ID = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                 "sac%2Blogos%2Bava1-l14-linearMSE.pth")


def create_open_clip(model_name: str, pretrained: str | None = None):
    """``open_clip.create_model(model_name, pretrained)`` in fp32 with its tokenizer; a missing or
    undownloadable ``pretrained`` becomes a :class:`~diffalign.rewards.loading.MissingWeightsError`."""
    import open_clip

    try:
        model = open_clip.create_model(model_name, pretrained=pretrained)
    except (RuntimeError, OSError) as e:
        if pretrained is None:
            raise
        raise missing_weights(f"open_clip {model_name}", f"pretrained={pretrained!r}", None,
                              url="open_clip's download of that tag", cause=e) from e
    return model, open_clip.get_tokenizer(model_name)


class HPSv2(RewardModel):
    """Human Preference Score v2 / v2.1: the raw cosine ``î · t̂`` of open_clip ViT-H-14 features
    (≈ 0.25–0.30), or ``100 · cos`` with ``benchmark_scale=True`` (the HPDv2 benchmark tables).
    v2.0 and v2.1 scores are not comparable, so the version is always explicit.

    Preprocessing: longest side to 224 (bicubic, on the tensor) and zero pad, OpenAI mean/std.
    The original ran under CUDA autocast; this runs in ``dtype`` (fp32 by default).
    """

    def __init__(self, model: nn.Module, tokenizer, version: str, benchmark_scale: bool = False,
                 transform: ImageTransform | None = None, mode: Mode = "exact", batch_size: int = 32,
                 dtype: torch.dtype = torch.float32):
        super().__init__(mode=mode, batch_size=batch_size)
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.tokenizer, self.version, self.benchmark_scale = tokenizer, version, benchmark_scale
        size = model.visual.image_size
        self.transform = transform or ImageTransform("longest", size[0] if isinstance(size, tuple) else size)
        self.name = f"hpsv{version[1:]}"

    @classmethod
    def from_pretrained(cls, version: str | None = None, weights: str | os.PathLike | None = None,
                        model_name: str = "ViT-H-14", benchmark_scale: bool = False, allow_pickle: bool = False,
                        **kw) -> HPSv2:
        """``version``: "v2.0" or "v2.1" (required). ``weights``: the checkpoint file, a folder holding
        it, or a hub id (default ``xswu/HPSv2``). Loads ``ckpt['state_dict']`` strictly into
        ``open_clip.create_model(model_name, pretrained=None)``. The original ``.pt`` files are pickled:
        they load only with ``allow_pickle=True`` (``--allow-pickle``); a ``.safetensors`` loads without."""
        if version not in HPS_FILES:
            raise ValueError(f"HPSv2 needs an explicit version, 'v2.0' or 'v2.1' (got {version!r}); "
                             "their scores are not comparable")
        path = resolve_file(weights, HPS_FILES[version], HPS_HUB_ID, what=f"HPSv{version[1:]}")
        sd = load_state_dict_file(path, key=None if path.suffix == ".safetensors" else "state_dict",
                                  allow_pickle=allow_pickle)  # first: a refused file builds no model
        model, tokenizer = create_open_clip(model_name)
        load_strict(model, sd, f"HPSv{version[1:]} ({path.name})")
        return cls(model, tokenizer, version, benchmark_scale, **kw)

    def _score(self, images: Images, prompts: list[str]) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        pixels = self.transform(images, self.mode).to(self.device, dtype)
        img = self.model.encode_image(pixels, normalize=True)
        txt = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        cos = (img * txt).sum(-1)
        return 100.0 * cos if self.benchmark_scale else cos


class AestheticHead(nn.Module):
    """The LAION aesthetic v2 MLP: 768→1024→128→64→16→1 with dropouts (0.2, 0.2, 0.1) and no
    activations, so in eval mode it is one affine map. State-dict keys ``layers.{0,2,4,6,7}``."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """``[B, 768]`` L2-normalised CLIP embeddings -> ``[B]`` scores (AVA 1–10 scale)."""
        return self.layers(embedding).squeeze(-1)

    @classmethod
    def from_file(cls, path: str | os.PathLike, allow_pickle: bool = False) -> AestheticHead:
        """Load a ``.safetensors`` state dict, or (``allow_pickle=True``) the original ``.pth`` (a plain state
        dict, ``torch.load(weights_only=True)``), strictly."""
        sd = load_state_dict_file(path, allow_pickle=allow_pickle)
        head = cls(sd["layers.0.weight"].shape[1] if "layers.0.weight" in sd else 768)
        load_strict(head, sd, f"LAION aesthetic head ({os.path.basename(str(path))})")
        return head.eval()


class LaionAesthetic(RewardModel):
    """LAION improved aesthetic predictor v2: ``head(î)`` with ``î`` the L2-normalised image embedding
    of OpenAI CLIP ViT-L/14 (open_clip ``ViT-L-14-quickgelu``, ``openai``: QuickGELU matters, about
    0.6 points); AVA 1–10 scale (SD1.5 ≈ 5.4, SDXL ≈ 6.1). The prompt is ignored.

    Preprocessing: OpenAI CLIP's (shortest side 224 bicubic, torchvision center crop, OpenAI mean/std).
    """

    name = "laion-aesthetic"

    def __init__(self, clip: nn.Module, head: AestheticHead, transform: ImageTransform | None = None,
                 mode: Mode = "exact", batch_size: int = 32, dtype: torch.dtype = torch.float32):
        super().__init__(mode=mode, batch_size=batch_size)
        self.clip = clip.to(dtype).eval().requires_grad_(False)
        self.head = head.to(dtype).eval().requires_grad_(False)
        size = clip.visual.image_size
        self.transform = transform or ImageTransform("shortest", size[0] if isinstance(size, tuple) else size)

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None, backbone: str = "ViT-L-14-quickgelu",
                        backbone_weights: str | None = "openai", allow_pickle: bool = False,
                        **kw) -> LaionAesthetic:
        """``weights``: the head's ``.pth`` file or a folder holding it (default: downloaded from the
        upstream repository), or a ``.safetensors`` of it. ``backbone_weights``: an open_clip pretrained
        tag or a local file. A pickled file (the original ``.pth``, a local ``.pt`` backbone) loads only
        with ``allow_pickle=True`` (``--allow-pickle``)."""
        head = AestheticHead.from_file(resolve_file(weights, AESTHETIC_FILE, None, what="LAION aesthetic head",
                                                    url=AESTHETIC_URL), allow_pickle=allow_pickle)
        if backbone_weights and os.path.isfile(backbone_weights) and not backbone_weights.endswith(".safetensors") \
                and not allow_pickle:
            raise pickled_reward_error(backbone_weights, "open_clip backbone")
        clip, _ = create_open_clip(backbone, backbone_weights)
        return cls(clip, head, **kw)

    def embed(self, images: Images) -> torch.Tensor:
        """L2-normalised image embeddings ``[B, D]``."""
        pixels = self.transform(images, self.mode).to(self.device, next(self.clip.parameters()).dtype)
        return self.clip.encode_image(pixels, normalize=True)

    def _score(self, images: Images, prompts: Sequence) -> torch.Tensor:
        return self.head(self.embed(images))
