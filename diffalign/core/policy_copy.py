"""A second copy of a backbone's trainable weights: the "old" or EMA policy of the forward-process
on-line methods (DiffusionNFT's old policy, AWM's EMA-KL anchor, DGPO's ``ema_ref``).

The originals keep it as a second LoRA adapter (``"old"`` / ``"ema"``) or as an EMA wrapper whose
weights are copied into the model around a call. Here it is a dict of tensors with the same names as
the backbone's trainable parameters; :meth:`PolicyCopy.active` copies them into the model for the
duration of a ``with`` block (no gradients) and restores the trained weights on exit, as
``copy_ema_to(..., store_temp=True)`` / ``copy_temp_to`` do in the originals. With LoRA that is a
few MB per swap; a full fine-tune keeps a whole denoiser copy (on the weights' device).

Update rule (:meth:`PolicyCopy.update`): ``θ_copy ← d·θ_copy + (1 − d)·θ`` with the method's decay
``d`` (``d = 0``: the copy becomes the current weights).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch


def _trainable(backbone) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in backbone.raw_denoiser.named_parameters() if p.requires_grad}


class PolicyCopy:
    """A snapshot of ``backbone``'s trainable weights (taken at construction), updated by EMA."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.weights = {n: p.detach().clone() for n, p in _trainable(backbone).items()}
        if not self.weights:
            raise ValueError("the backbone has no trainable weights to copy (add a LoRA or enable full fine-tuning)")

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """``θ_copy ← decay·θ_copy + (1 − decay)·θ`` for every trainable tensor (``decay`` in [0, 1])."""
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        for name, p in _trainable(self.backbone).items():
            w = self.weights[name]
            w.mul_(decay).add_(p.detach().to(w), alpha=1.0 - decay)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside, the backbone's trainable weights are the copy's (the trained ones come back on exit)."""
        params = _trainable(self.backbone)
        current = {n: p.detach().clone() for n, p in params.items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(self.weights[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(current[n])

    def max_abs_difference(self) -> float:
        """``max |θ_copy − θ|`` over every trainable tensor (0 right after a copy with decay 0)."""
        return max(float((self.weights[n] - p.detach().to(self.weights[n])).abs().max())
                   for n, p in _trainable(self.backbone).items())

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        save_file({n: w.detach().cpu().contiguous() for n, w in self.weights.items()}, str(path))

    def load(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(path))
        missing = set(self.weights) - set(state)
        if missing:
            raise ValueError(f"{path}: the saved policy copy lacks {len(missing)} weights, e.g. {sorted(missing)[0]}")
        for n, w in self.weights.items():
            w.copy_(state[n].to(w))
