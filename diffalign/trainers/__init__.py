"""Thin trainers on one shared accelerate loop: one small module per method."""

from diffalign.trainers.dpo import DiffusionDPO, DiffusionDPOConfig
from diffalign.trainers.kto import DiffusionKTO, DiffusionKTOConfig
from diffalign.trainers.mapo import MaPO, MaPOConfig
from diffalign.trainers.method import Method, StepOutput, TrainBatch
from diffalign.trainers.sft import SFT, SFTConfig

METHODS: dict[str, type[Method]] = {m.name: m for m in (DiffusionDPO, MaPO, DiffusionKTO, SFT)}


def build_method(spec: dict, backbone) -> Method:
    """``{"name": "diffusion-dpo", "beta": 5000, ...}`` → a method with its config dataclass."""
    spec = dict(spec)
    name = spec.pop("name")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    cls = METHODS[name]
    try:
        config = cls.config_class(**spec)
    except TypeError as e:
        raise ValueError(f"bad option for method {name!r}: {e}") from None
    return cls(config, backbone)


__all__ = ["METHODS", "build_method", "Method", "StepOutput", "TrainBatch", "DiffusionDPO", "DiffusionDPOConfig",
           "MaPO", "MaPOConfig", "DiffusionKTO", "DiffusionKTOConfig", "SFT", "SFTConfig"]
