"""The one method registry: every training method, image or text, by name.

A method registers itself where it is defined::

    @register_method("diffusion-dpo", DiffusionDPOConfig, kind="offline")
    class DiffusionDPO(Method):
        ...

with its config dataclass and the kind of step it needs (:data:`KINDS`). The kind picks the
trainer that runs it (:func:`run_recipe`); the config class is what a recipe's ``method`` section
becomes when the recipe loads (:func:`build_config`, called by
:func:`diffalign.trainers.config.load_recipe` before any model loads).

:func:`methods` imports the modules that define methods (the one place that lists them), lazily:
importing this module imports no trainer, so commands that do not train (``diffalign score``) do
not pay for them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffalign.trainers.config import ConfigError, MethodSection, build_dataclass, check_ranges

KINDS: dict[str, str] = {
    "offline": "an encoded, noised batch of stored data (pairs, feedback, ranked lists) on the offline loop",
    "online": "rollouts with per-step log-probs, then updates on the stored transitions",
    "backprop": "sampling with gradients into a differentiable reward",
    "video": "video pairs with per-segment labels on the offline loop",
    "text": "a causal language model on TRL-format text data",
}


@dataclass(frozen=True)
class MethodEntry:
    """A registered method: its name, class, config dataclass and kind (a key of :data:`KINDS`)."""

    name: str
    method_class: type
    config_class: type
    kind: str


_REGISTRY: dict[str, MethodEntry] = {}


def register_method(name: str, config: type, *, kind: str) -> Callable[[type], type]:
    """Class decorator: register a method as ``name`` with its config dataclass and its ``kind``.

    Sets ``name``, ``config_class`` and ``kind`` on the class (what the trainers read)."""
    if kind not in KINDS:
        raise ValueError(f"unknown method kind {kind!r}; choose from {sorted(KINDS)}")

    def decorate(cls: type) -> type:
        old = _REGISTRY.get(name)
        if old is not None and old.method_class.__qualname__ != cls.__qualname__:
            raise ValueError(f"method name {name!r} is taken by {old.method_class.__qualname__}")
        cls.name, cls.config_class, cls.kind = name, config, kind
        _REGISTRY[name] = MethodEntry(name, cls, config, kind)
        return cls

    return decorate


def _import_method_modules() -> None:
    """Import every module that defines methods: their decorators fill the registry."""
    import diffalign.text.methods  # noqa: F401
    import diffalign.trainers.backprop  # noqa: F401
    import diffalign.trainers.d3po  # noqa: F401
    import diffalign.trainers.dcpo  # noqa: F401
    import diffalign.trainers.ddpo  # noqa: F401
    import diffalign.trainers.densedpo  # noqa: F401
    import diffalign.trainers.dpo  # noqa: F401
    import diffalign.trainers.inpo  # noqa: F401
    import diffalign.trainers.inversion_dpo  # noqa: F401
    import diffalign.trainers.kto  # noqa: F401
    import diffalign.trainers.mapo  # noqa: F401
    import diffalign.trainers.rankdpo  # noqa: F401
    import diffalign.trainers.seppo  # noqa: F401
    import diffalign.trainers.sft  # noqa: F401
    import diffalign.trainers.smpo  # noqa: F401
    import diffalign.trainers.tpo  # noqa: F401


def methods(kind: str | None = None) -> dict[str, MethodEntry]:
    """All registered methods by name (those of one ``kind`` if given), sorted by name."""
    _import_method_modules()
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown method kind {kind!r}; choose from {sorted(KINDS)}")
    return {n: e for n, e in sorted(_REGISTRY.items()) if kind is None or e.kind == kind}


def get_method(name: str | None) -> MethodEntry:
    """The registered method ``name``; a :class:`ConfigError` listing the known ones otherwise."""
    found = methods()
    if name not in found:
        raise ConfigError(f"unknown method {name!r}; choose from {sorted(found)}")
    return found[name]


def build_config(name: str, options: Mapping[str, Any]) -> Any:
    """Method ``name``'s config dataclass from its options: unknown options, wrong types and
    out-of-range values are one :class:`ConfigError` (naming the known options)."""
    entry = get_method(name)
    where = f"method {name!r}"
    config = build_dataclass(entry.config_class, dict(options), where, method=True)
    check_ranges(config, where)
    return config


def method_section(spec: Mapping[str, Any]) -> MethodSection:
    """A recipe's ``method`` section (``{"name": ..., **options}``) as its typed :class:`MethodSection`."""
    if isinstance(spec, MethodSection):
        return spec
    if not isinstance(spec, Mapping):
        raise ConfigError(f"the method section must be a mapping with a 'name', not {spec!r}")
    options = dict(spec)
    name = options.pop("name", "diffusion-dpo")
    return MethodSection(name, build_config(name, options))


def build_method(spec: Mapping[str, Any], backbone) -> Any:
    """``{"name": "diffusion-dpo", "beta": 5000, ...}`` (or a :class:`MethodSection`) → the method
    on ``backbone`` (an image backbone, or a causal LM for text methods)."""
    section = method_section(spec)
    # a copy: the recipe's config stays as loaded (config.yaml)
    return get_method(section.name).method_class(copy.deepcopy(section.config), backbone)


def trainer_for(kind: str) -> Callable[[Any], Path]:
    """The ``train(recipe) -> run dir`` function that runs methods of ``kind``."""
    if kind == "offline":
        from diffalign.trainers.loop import train
    elif kind == "online":
        from diffalign.trainers.online import train
    elif kind == "backprop":
        from diffalign.trainers.backprop import train
    elif kind == "video":
        from diffalign.trainers.densedpo import train
    elif kind == "text":
        from diffalign.text.trainer import train
    else:
        raise ValueError(f"unknown method kind {kind!r}; choose from {sorted(KINDS)}")
    return train


def run_recipe(recipe) -> Path:
    """Train ``recipe`` with the trainer of its method's kind; returns the run directory."""
    return trainer_for(get_method(recipe.method["name"]).kind)(recipe)


__all__ = ["KINDS", "MethodEntry", "build_config", "build_method", "get_method", "method_section", "methods",
           "register_method", "run_recipe", "trainer_for"]
