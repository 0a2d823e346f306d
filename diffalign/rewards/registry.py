"""Reward models by name: ``load_reward(name_or_path, **kw)``, ``list_rewards()``, ``register_reward``.

Each name maps to a factory ``(**kw) -> RewardModel`` and to a card ``reward_models/<name>.yaml``
(backbone, weights id, preprocessing, score scale, license). Factories import their dependencies
lazily, so listing rewards imports neither transformers nor open_clip.

Common keyword arguments: ``weights`` (hub id, local folder or file), ``mode`` ("exact" |
"differentiable"), ``batch_size``, ``dtype`` (fp32 default). A local folder can also be loaded
directly: ``load_reward(DIR)`` reads ``DIR/reward.yaml`` (``reward: NAME`` plus default keyword
arguments) and passes ``weights=DIR``.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

from diffalign.rewards.base import RewardCard, RewardModel

_FACTORIES: dict[str, Callable[..., RewardModel]] = {}
CARD_ENV = "DIFFALIGN_REWARD_CARDS"


def register_reward(name: str) -> Callable[[Callable[..., RewardModel]], Callable[..., RewardModel]]:
    """Decorator: register a factory ``(**kw) -> RewardModel`` under ``name`` (lower case)."""
    def deco(factory: Callable[..., RewardModel]) -> Callable[..., RewardModel]:
        key = name.lower()
        if key.startswith("remote:"):
            raise ValueError(f"reward names cannot start with 'remote:' (that prefix names a served reward): {name!r}")
        if key in _FACTORIES and _FACTORIES[key] is not factory:
            raise ValueError(f"reward {name!r} is already registered")
        _FACTORIES[key] = factory
        return factory
    return deco


def list_rewards() -> list[str]:
    """Registered reward names, sorted."""
    return sorted(_FACTORIES)


def is_reward(name: str | os.PathLike) -> bool:
    """Whether :func:`load_reward` takes ``name``: a registered name, a folder with a ``reward.yaml``, or a
    served reward ``remote:URL`` (:mod:`diffalign.rewards.remote`; whether it answers is checked on loading)."""
    from diffalign.rewards.remote import is_remote

    return (str(name).lower() in _FACTORIES or (Path(name) / "reward.yaml").is_file()
            or is_remote(str(name)))


def card_dirs() -> list[Path]:
    """Where cards are looked up: ``$DIFFALIGN_REWARD_CARDS``, the checkout's ``reward_models/``,
    then ``diffalign/rewards/cards/``. In git that is a symlink to ``reward_models/``; a wheel build
    (package data ``rewards/cards/*.yaml``) copies the files it points to, so an installed wheel
    has its own cards."""
    dirs = [Path(p) for p in os.environ.get(CARD_ENV, "").split(os.pathsep) if p]
    here = Path(__file__).resolve().parent
    return dirs + [here.parents[1] / "reward_models", here / "cards"]


def get_card(name: str) -> RewardCard | None:
    """The card of ``name``, or None when no card file exists."""
    for d in card_dirs():
        path = d / f"{name.lower()}.yaml"
        if path.is_file():
            return RewardCard.from_yaml(path)
    return None


def load_reward(name_or_path: str | os.PathLike, allow_pickle: bool = False, **kw) -> RewardModel:
    """Build a registered reward (``"pickscore"``, ``"hpsv2.1"``, ...) or a local folder with a
    ``reward.yaml``; keyword arguments go to the reward's factory. The card is attached as ``.card``.

    Weights load from safetensors only: a pickled checkpoint (``.pt``/``.pth``/``.bin``) is refused, naming
    ``--allow-pickle``, unless ``allow_pickle=True``. It reaches the factories that name ``allow_pickle`` in
    their signature (those that read weight files); a ``reward.yaml`` cannot set it (a folder must not opt
    itself in).

    ``remote:http://HOST:PORT`` (or ``remote:NAME@HOST:PORT``) is a reward served by ``diffalign reward serve``
    in another process (:class:`~diffalign.rewards.remote.RemoteReward`; ``kw``: ``timeout``, ``retries``,
    ``backoff``, ``batch_size``); its weights and ``allow_pickle`` are the server's business."""
    from diffalign.rewards.remote import is_remote

    if is_remote(str(name_or_path)):
        from diffalign.rewards.remote import RemoteReward

        if "weights" in kw:
            raise ValueError(f"{name_or_path}: a served reward's weights are loaded by the server; pass --weights "
                             "to `diffalign reward serve` instead")
        return RemoteReward.from_spec(str(name_or_path), **kw)
    path = Path(name_or_path)
    if path.is_dir() and (path / "reward.yaml").is_file():
        import yaml

        spec = yaml.safe_load((path / "reward.yaml").read_text()) or {}
        if "reward" not in spec:
            raise ValueError(f"{path / 'reward.yaml'}: no 'reward' field naming a registered reward")
        if "allow_pickle" in spec:
            from diffalign.errors import UsageError

            raise UsageError(f"{path / 'reward.yaml'}: sets allow_pickle, which only the caller may "
                             "(--allow-pickle): a folder cannot opt itself into unpickling")
        name = str(spec.pop("reward"))
        kw = {**spec, "weights": str(path), **kw}
    else:
        name = str(name_or_path)
    key = name.lower()
    if key not in _FACTORIES:
        raise KeyError(f"unknown reward {name!r}; registered: {', '.join(list_rewards())} "
                       "(or a folder holding a reward.yaml)")
    factory = _FACTORIES[key]
    if "allow_pickle" in inspect.signature(factory).parameters:
        kw["allow_pickle"] = allow_pickle
    model = factory(**kw)
    model.card = get_card(model.name) or get_card(key)
    return model


# ---------------------------------------------------------------------------- built-in rewards


@register_reward("pickscore")
def _pickscore(allow_pickle: bool = False, **kw) -> RewardModel:
    from diffalign.rewards.hf_clip import PickScore

    return PickScore.from_pretrained(allow_pickle=allow_pickle, **kw)


@register_reward("hpsv2")
def _hpsv2(version: str | None = None, allow_pickle: bool = False, **kw) -> RewardModel:
    from diffalign.rewards.open_clip_rewards import HPSv2

    return HPSv2.from_pretrained(version=version, allow_pickle=allow_pickle, **kw)


@register_reward("hpsv2.0")
def _hpsv20(allow_pickle: bool = False, **kw) -> RewardModel:
    return _hpsv2(version="v2.0", allow_pickle=allow_pickle, **kw)


@register_reward("hpsv2.1")
def _hpsv21(allow_pickle: bool = False, **kw) -> RewardModel:
    return _hpsv2(version="v2.1", allow_pickle=allow_pickle, **kw)


@register_reward("laion-aesthetic")
def _aesthetic(allow_pickle: bool = False, **kw) -> RewardModel:
    from diffalign.rewards.open_clip_rewards import LaionAesthetic

    return LaionAesthetic.from_pretrained(allow_pickle=allow_pickle, **kw)


@register_reward("clipscore")
def _clipscore(variant: str | None = None, allow_pickle: bool = False, **kw) -> RewardModel:
    from diffalign.rewards.hf_clip import CLIPScore

    return CLIPScore.from_pretrained(variant=variant, allow_pickle=allow_pickle, **kw)


for _variant in ("hessel", "torchmetrics", "raw"):
    register_reward(f"clipscore-{_variant}")(
        lambda _v=_variant, allow_pickle=False, **kw: _clipscore(variant=_v, allow_pickle=allow_pickle, **kw))


@register_reward("imagereward")
def _imagereward(allow_pickle: bool = False, **kw) -> RewardModel:
    from diffalign.rewards.imagereward import ImageReward

    return ImageReward.from_pretrained(allow_pickle=allow_pickle, **kw)


@register_reward("mps")
def _mps(allow_pickle: bool = False, **kw) -> RewardModel:
    from diffalign.rewards.mps import MPS

    return MPS.from_pretrained(allow_pickle=allow_pickle, **kw)


@register_reward("hpsv3")
def _hpsv3(allow_pickle: bool = False, **kw) -> RewardModel:
    from diffalign.rewards.hpsv3 import HPSv3

    return HPSv3.from_pretrained(allow_pickle=allow_pickle, **kw)


@register_reward("unifiedreward")
def _unifiedreward(allow_pickle: bool = False, **kw) -> RewardModel:
    from diffalign.rewards.unified_reward import UnifiedReward

    return UnifiedReward.from_pretrained(allow_pickle=allow_pickle, **kw)


@register_reward("unifiedreward-pairwise")
def _unifiedreward_pairwise(allow_pickle: bool = False, **kw) -> RewardModel:
    from diffalign.rewards.unified_reward import UnifiedRewardPairwise

    return UnifiedRewardPairwise.from_pretrained(allow_pickle=allow_pickle, **kw)


@register_reward("jpeg-incompressibility")
def _jpeg_incompressibility(**kw) -> RewardModel:
    from diffalign.rewards.jpeg import JpegReward

    return JpegReward(sign=1.0, **kw)


@register_reward("jpeg-compressibility")
def _jpeg_compressibility(**kw) -> RewardModel:
    from diffalign.rewards.jpeg import JpegReward

    return JpegReward(sign=-1.0, **kw)


@register_reward("shapes-eval")
def _shapes_eval(**kw) -> RewardModel:
    from diffalign.rewards.shapes import ShapesEvalReward

    return ShapesEvalReward(**kw)


@register_reward("shapes-oracle")
def _shapes_oracle(**kw) -> RewardModel:
    from diffalign.rewards.shapes import ShapesOracleReward

    return ShapesOracleReward(**kw)


@register_reward("shapes-clip")
def _shapes_clip(allow_pickle: bool = False, **kw) -> RewardModel:
    from diffalign.rewards.shapes import ShapesCLIP

    return ShapesCLIP.from_pretrained(allow_pickle=allow_pickle, **kw)


@register_reward("shapes-pickscore")
def _shapes_pickscore(allow_pickle: bool = False, **kw) -> RewardModel:
    from diffalign.rewards.shapes import ShapesPickScore

    return ShapesPickScore.from_pretrained(allow_pickle=allow_pickle, **kw)


@register_reward("brightness")
def _brightness(**kw) -> RewardModel:
    from diffalign.rewards.image_stats import BrightnessReward

    return BrightnessReward(**kw)
