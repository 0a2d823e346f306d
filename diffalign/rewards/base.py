"""The reward-model interface: ``score(images, prompts) -> tensor[B]`` in one of two modes.

``mode="exact"`` reproduces the original preprocessing (PIL resizes on uint8 images, the original
crop/pad arithmetic) and runs without gradients; ``mode="differentiable"`` applies the same steps
to float tensors (antialiased bicubic ``interpolate``) so gradients reach the pixels, for reward
backprop (AlignProp, DRaFT, ReFL). Images are PIL images or float tensors ``[B, 3, H, W]`` in
``[0, 1]``. Models run in fp32 unless a ``dtype`` is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

Mode = Literal["exact", "differentiable"]
Images = Sequence[Image.Image] | torch.Tensor
MODES: tuple[str, ...] = ("exact", "differentiable")


@dataclass
class RewardCard:
    """What a user needs to read a score: the model card of one registered reward.

    Attributes:
        name: registry name.
        backbone: architecture (e.g. "open_clip ViT-H-14").
        weights: hub id / URL and file names of the original weights.
        preprocessing: a short description of the original image pipeline.
        score: the formula and its scale (typical range).
        license: of the weights (and code) as far as known.
        normalization: fixed ``{"mean", "std"}`` used by :func:`diffalign.rewards.combine` when
            asked for ``normalize="card"``; ``None`` when no reference statistics are known.
        extra: any other card field, kept as read.
    """

    name: str
    backbone: str = ""
    weights: dict[str, Any] = field(default_factory=dict)
    preprocessing: str = ""
    score: str = ""
    license: str = ""
    normalization: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RewardCard:
        import yaml

        data = yaml.safe_load(Path(path).read_text()) or {}
        if "name" not in data:
            raise ValueError(f"{path}: reward card has no 'name' field")
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})


def to_tensor(images: Images) -> torch.Tensor:
    """PIL images (same size) or a ``[B, 3, H, W]`` tensor -> float tensor ``[B, 3, H, W]`` in [0, 1]."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensors must be [B, 3, H, W], got {tuple(images.shape)}")
        return images
    from diffalign.data.pairs import to_rgb  # transparency composited on white, as training does

    arrays = [np.asarray(to_rgb(im), dtype=np.float32) / 255.0 for im in images]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError("PIL images of different sizes cannot be stacked into one tensor")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """A ``[B, 3, H, W]`` tensor in [0, 1] -> the 8-bit images ``[B, H, W, 3]`` (``round(x*255)``, clamped):
    what a saved PNG holds, and what every reward's exact mode scores."""
    arr = (to_tensor(images).detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8)
    return arr.permute(0, 2, 3, 1).contiguous().numpy()


def to_pil(images: Images) -> list[Image.Image]:
    """A ``[B, 3, H, W]`` tensor in [0, 1] -> RGB PIL images (:func:`to_uint8`); PIL passes through
    (as RGB, transparency composited on white)."""
    if not isinstance(images, torch.Tensor):
        from diffalign.data.pairs import to_rgb

        return [to_rgb(im) for im in images]
    return [Image.fromarray(a) for a in to_uint8(images)]


class RewardModel(torch.nn.Module):
    """Base class of every reward: ``score(images, prompts) -> tensor[B]`` (float32, on the model's device).

    Subclasses implement :meth:`_score` for one batch. Set ``differentiable = False`` for rewards
    that cannot give pixel gradients (JPEG size, Shapes evaluator); asking them for
    ``mode="differentiable"`` raises.

    Args:
        mode: "exact" (original preprocessing, no gradients) or "differentiable".
        batch_size: images per forward pass; ``score`` splits larger inputs.
        card: the model card (filled in by :func:`~diffalign.rewards.load_reward`).
    """

    name: str = "reward"
    differentiable: bool = True

    def __init__(self, mode: Mode = "exact", batch_size: int = 32, card: RewardCard | None = None):
        super().__init__()
        self.mode = mode
        self.batch_size = batch_size
        self.card = card

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        if value == "differentiable" and not self.differentiable:
            raise ValueError(f"reward {self.name!r} has no differentiable mode")
        self._mode = value

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def score(self, images: Images, prompts: Sequence[Any]) -> torch.Tensor:
        """Scores ``[B]`` of ``images`` (B PIL images or ``[B, 3, H, W]`` in [0, 1]) for ``prompts`` (B)."""
        n = len(images)
        if n != len(prompts):
            raise ValueError(f"{n} images but {len(prompts)} prompts")
        if n == 0:
            return torch.zeros(0)
        out = []
        grad = torch.enable_grad() if self.mode == "differentiable" else torch.no_grad()
        with grad:
            for i in range(0, n, self.batch_size):
                out.append(self._score(images[i:i + self.batch_size], list(prompts[i:i + self.batch_size])).float())
        return torch.cat(out)

    def score_async(self, images: Images, prompts: Sequence[Any]) -> Future:
        """:meth:`score` as a ``concurrent.futures.Future`` of the scores ``[B]``. An in-process reward scores
        at once, on the calling thread, and returns a finished future (the same numbers as :meth:`score`);
        :class:`~diffalign.rewards.remote.RemoteReward` sends the request from a worker thread and returns
        before the server answers, so a rollout can sample its next batch meanwhile."""
        future: Future = Future()
        try:
            future.set_result(self.score(images, prompts))
        except Exception as e:  # re-raised by future.result(), where the caller waits
            future.set_exception(e)
        return future

    def forward(self, images: Images, prompts: Sequence[Any]) -> torch.Tensor:
        return self.score(images, prompts)

    def _score(self, images: Images, prompts: list[Any]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}, mode={self.mode!r}"
