"""Differentiable image-statistic rewards: cheap, prompt-free targets for testing reward backprop.

``brightness``: the mean Rec. 601 luma of the image,

    r(x) = mean_{h,w} (0.299 R + 0.587 G + 0.114 B)            in [0, 1]
    r(x) = −| mean luma − target |                               with ``target`` (in [0, 1])

It needs no weights, runs in microseconds and has an exact gradient w.r.t. every pixel, so a
reward-backprop trainer (AlignProp, DRaFT, ReFL) can be shown to move it, and a sign-flipped run to
move it the other way, within seconds on a CPU (the Shapes efficacy tests). It says nothing about
image quality or prompt fidelity; the prompt is ignored.
"""

from __future__ import annotations

import torch

from diffalign.rewards.base import Images, Mode, RewardModel, to_pil, to_tensor

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, as PIL's convert("L")


class BrightnessReward(RewardModel):
    """Mean luma of each image (or ``−|luma − target|``); ``[B]`` from ``[B, 3, H, W]`` in [0, 1].

    ``mode="exact"`` scores the 8-bit image (``round(x · 255)``, as a saved PNG holds it);
    ``"differentiable"`` scores the float tensor as given, with gradients.

    Args:
        target: a luma in [0, 1] to approach; None maximises the brightness.
    """

    name = "brightness"

    def __init__(self, target: float | None = None, mode: Mode = "exact", batch_size: int = 256):
        super().__init__(mode=mode, batch_size=batch_size)
        if target is not None and not 0.0 <= float(target) <= 1.0:
            raise ValueError(f"brightness target must be in [0, 1], got {target}")
        self.target = None if target is None else float(target)

    def _score(self, images: Images, prompts: list) -> torch.Tensor:
        x = to_tensor(images if self.mode == "differentiable" else to_pil(images)).float()
        weights = torch.tensor(LUMA, device=x.device).view(1, 3, 1, 1)
        luma = (x * weights).sum(1).mean(dim=(1, 2))                   # [B]
        return luma if self.target is None else -(luma - self.target).abs()
