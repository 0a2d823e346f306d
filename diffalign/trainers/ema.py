"""The evaluation EMA: a moving average of the trainable weights, for checkpoints, validation and ``final/``.

``train.ema_decay = d > 0`` keeps, beside the weights the optimizer steps, their exponential moving average
(diffusers' :class:`~diffusers.training_utils.EMAModel`, without its optional power warm-up)::

    after optimizer step n = 1, 2, ...:  d_1 = 0,  d_n = min(d, n / (n + 9))
                                         θ_ema ← d_n · θ_ema + (1 − d_n) · θ

Training (and an on-line method's rollouts) use θ; the weights a run hands out — each checkpoint's
diffusers-format weights, the validation images and ``final/`` — are θ_ema, as Flow-GRPO's and
DiffusionNFT's ``EMAModuleWrapper`` (decay 0.9, one update an optimizer step, the same warm-up) do.
A checkpoint keeps θ (``trainable.safetensors``) and θ_ema (``ema.safetensors``, with the update count
in ``trainer_state.json``), so a resumed run continues both. Not under FSDP / DeepSpeed (sharded weights).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

EMA_FILE = "ema.safetensors"


class WeightEMA:
    """The moving average of ``named`` (``[(name, parameter)]``, the trainable weights) at ``decay``."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], decay: float):
        from diffusers.training_utils import EMAModel

        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay must be in (0, 1) (0 turns the EMA off); got {decay}")
        self.names = [name for name, _ in named]
        self.parameters = [p for _, p in named]
        self.average = EMAModel(self.parameters, decay=decay)

    @property
    def updates(self) -> int:
        """Optimizer steps averaged so far."""
        return int(self.average.optimization_step)

    def update(self) -> None:
        """Fold the current weights in (call after each optimizer step that was taken)."""
        self.average.step(self.parameters)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside, the trainable weights are θ_ema; θ returns on exit (also on errors)."""
        self.average.store(self.parameters)
        self.average.copy_to(self.parameters)
        try:
            yield
        finally:
            self.average.restore(self.parameters)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """θ_ema by parameter name (CPU, contiguous), for ``ema.safetensors``."""
        return {n: s.detach().cpu().contiguous() for n, s in zip(self.names, self.average.shadow_params)}

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(self.state_tensors(), str(Path(folder) / EMA_FILE))

    def load(self, folder: Path, updates: int) -> None:
        """θ_ema from ``folder/ema.safetensors`` and the update count ``updates`` (a checkpoint's)."""
        from safetensors.torch import load_file

        path = Path(folder) / EMA_FILE
        if not path.is_file():  # the recipe, not the checkpoint, is wrong: no earlier checkpoint is tried
            from diffalign.errors import UsageError

            raise UsageError(f"{path}: missing; the run has train.ema_decay > 0 but this checkpoint holds no "
                             "EMA weights (it was written with train.ema_decay=0): resume with that setting")
        tensors = load_file(str(path))
        if sorted(tensors) != sorted(self.names):
            extra, missing = sorted(set(tensors) - set(self.names)), sorted(set(self.names) - set(tensors))
            raise RuntimeError(f"{path}: the EMA weights do not match the trainable weights "
                               f"(unexpected {extra[:3]}, missing {missing[:3]})")
        for name, shadow in zip(self.names, self.average.shadow_params):
            shadow.copy_(tensors[name].to(shadow.device, shadow.dtype))
        self.average.optimization_step = int(updates)
