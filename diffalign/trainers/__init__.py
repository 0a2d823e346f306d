"""Thin trainers on one shared accelerate loop: one small module per method.

Every method registers itself in :mod:`diffalign.trainers.registry` (its name, config dataclass and
kind of step); :func:`build_method` and :func:`run_recipe` go through it.
"""

from diffalign.trainers.d3po import D3PO, D3POConfig
from diffalign.trainers.dcpo import DCPO, DCPOConfig
from diffalign.trainers.ddpo import DDPO, GRPO, DDPOConfig, FlowGRPO, FlowGRPOConfig, GRPOConfig, PrefGRPO, PrefGRPOConfig
from diffalign.trainers.densedpo import DenseDPO, DenseDPOConfig
from diffalign.trainers.dpo import DiffusionDPO, DiffusionDPOConfig
from diffalign.trainers.inpo import InPO, InPOConfig
from diffalign.trainers.inversion_dpo import InversionDPO, InversionDPOConfig
from diffalign.trainers.kto import DiffusionKTO, DiffusionKTOConfig
from diffalign.trainers.mapo import MaPO, MaPOConfig
from diffalign.trainers.method import Method, StepOutput, TrainBatch
from diffalign.trainers.rankdpo import RankDPO, RankDPOConfig
from diffalign.trainers.registry import build_method, methods, register_method, run_recipe
from diffalign.trainers.seppo import SePPO, SePPOConfig
from diffalign.trainers.sft import SFT, SFTConfig
from diffalign.trainers.smpo import SmPO, SmPOConfig
from diffalign.trainers.tpo import TPO, TPOConfig


def __getattr__(name: str):
    # METHODS: every registered method (image and text) by name, read from the one registry
    if name == "METHODS":
        return {n: e.method_class for n, e in methods().items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["METHODS", "build_method", "methods", "register_method", "run_recipe", "Method", "StepOutput",
           "TrainBatch", "DiffusionDPO", "DiffusionDPOConfig", "MaPO", "MaPOConfig", "DiffusionKTO", "DiffusionKTOConfig", "SFT", "SFTConfig"]
__all__ += ["DDPO", "DDPOConfig", "GRPO", "GRPOConfig", "FlowGRPO", "FlowGRPOConfig", "PrefGRPO",
            "PrefGRPOConfig", "D3PO", "D3POConfig", "SePPO", "SePPOConfig"]
__all__ += ["DenseDPO", "DenseDPOConfig"]
__all__ += ["InPO", "InPOConfig", "InversionDPO", "InversionDPOConfig", "SmPO", "SmPOConfig",
            "RankDPO", "RankDPOConfig", "DCPO", "DCPOConfig", "TPO", "TPOConfig"]
