"""Thin trainers on one shared accelerate loop: one small module per method."""

from pathlib import Path

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
from diffalign.trainers.seppo import SePPO, SePPOConfig
from diffalign.trainers.sft import SFT, SFTConfig
from diffalign.trainers.smpo import SmPO, SmPOConfig
from diffalign.trainers.tpo import TPO, TPOConfig

METHODS: dict[str, type[Method]] = {m.name: m for m in (DiffusionDPO, MaPO, DiffusionKTO, SFT, DenseDPO)}


# Inversion and structured-preference methods (the offline loop): where x_t comes from, ranked lists,
# per-pair smoothed β, loser captions, caption preferences.
STRUCTURED_METHODS = (InPO, InversionDPO, SmPO, RankDPO, DCPO, TPO)
METHODS.update({m.name: m for m in STRUCTURED_METHODS})

# Methods with their own trainer on the shared loop: method name -> module with ``train(recipe) -> Path``.
TRAINERS: dict[str, str] = {name: "diffalign.trainers.backprop" for name in ("alignprop", "draft", "draft-lv", "refl")}
TRAINERS["densedpo"] = "diffalign.trainers.densedpo"  # video pairs with segment labels, on the offline loop

# On-line methods (rollouts with per-step log-probs, then updates on the stored transitions).
ONLINE_METHODS = (DDPO, GRPO, FlowGRPO, PrefGRPO, D3PO, SePPO)
METHODS.update({m.name: m for m in ONLINE_METHODS})
TRAINERS.update({m.name: "diffalign.trainers.online" for m in ONLINE_METHODS})

# Causal-LM methods (diffalign.text.methods.TEXT_METHODS): the same loop with a text backbone and TRL-format data.
TEXT_METHOD_NAMES = ("text-sft", "text-dpo", "text-kto", "text-simpo", "text-orpo")
TRAINERS.update({name: "diffalign.text.trainer" for name in TEXT_METHOD_NAMES})


def run_recipe(recipe) -> Path:
    """Train ``recipe`` with its method's trainer (the offline loop unless :data:`TRAINERS` names
    another); returns the run directory."""
    import importlib

    module = TRAINERS.get(recipe.method.get("name", ""), "diffalign.trainers.loop")
    return importlib.import_module(module).train(recipe)


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


__all__ = ["METHODS", "TRAINERS", "build_method", "run_recipe", "Method", "StepOutput", "TrainBatch", "DiffusionDPO",
           "DiffusionDPOConfig", "MaPO", "MaPOConfig", "DiffusionKTO", "DiffusionKTOConfig", "SFT", "SFTConfig"]
__all__ += ["ONLINE_METHODS", "DDPO", "DDPOConfig", "GRPO", "GRPOConfig", "FlowGRPO", "FlowGRPOConfig", "PrefGRPO",
            "PrefGRPOConfig", "D3PO", "D3POConfig", "SePPO", "SePPOConfig"]
__all__ += ["DenseDPO", "DenseDPOConfig"]
__all__ += ["STRUCTURED_METHODS", "InPO", "InPOConfig", "InversionDPO", "InversionDPOConfig", "SmPO", "SmPOConfig",
            "RankDPO", "RankDPOConfig", "DCPO", "DCPOConfig", "TPO", "TPOConfig"]
