"""The one method registry: every training method, image or text, by name, and the route from a recipe
to its trainer.

A method registers itself where it is defined::

    @register_method("diffusion-dpo", DiffusionDPOConfig, kind="offline")
    class DiffusionDPO(Method):
        ...

with its config dataclass and the kind of step it needs (:data:`KINDS`); the decorator and the table
it fills live in :mod:`diffalign.trainers.method`, below every method. This module sits above them:
it imports every module that defines methods (the one place that lists them), turns a recipe's
``method`` section into that method's typed config when the recipe loads (:func:`load_recipe`, before
any model loads), and runs a recipe with the trainer of its method's kind (:func:`run_recipe`).
Imports run one way: ``cli → registry → engine (loop, online, ...) → core / objectives → models``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

# every module that defines methods: their decorators fill the table
import diffalign.text.methods  # noqa: F401
import diffalign.trainers.dcpo  # noqa: F401
import diffalign.trainers.dpo  # noqa: F401
import diffalign.trainers.inpo  # noqa: F401
import diffalign.trainers.inversion_dpo  # noqa: F401
import diffalign.trainers.kto  # noqa: F401
import diffalign.trainers.mapo  # noqa: F401
import diffalign.trainers.rankdpo  # noqa: F401
import diffalign.trainers.sft  # noqa: F401
import diffalign.trainers.smpo  # noqa: F401
import diffalign.trainers.tpo  # noqa: F401
from diffalign.recipes import apply_overrides, resolve_recipe
from diffalign.text import trainer as text_trainer
from diffalign.trainers import backprop, d3po, ddpo, densedpo, loop, online, seppo  # noqa: F401
from diffalign.trainers.config import (
    ConfigError,
    DataConfig,
    MethodSection,
    ModelConfig,
    Recipe,
    TrainConfig,
    build_dataclass,
    build_section,
    check_ranges,
)
from diffalign.trainers.method import KINDS, REGISTERED, MethodEntry, register_method

TRAINERS: dict[str, Callable[[Recipe], Path]] = {
    "offline": loop.train,
    "online": online.train,
    "backprop": backprop.train,
    "video": densedpo.train,
    "text": text_trainer.train,
}


def methods(kind: str | None = None) -> dict[str, MethodEntry]:
    """All registered methods by name (those of one ``kind`` if given), sorted by name."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown method kind {kind!r}; choose from {sorted(KINDS)}")
    return {n: e for n, e in sorted(REGISTERED.items()) if kind is None or e.kind == kind}


def get_method(name: str | None) -> MethodEntry:
    """The registered method ``name``; a :class:`ConfigError` listing the known ones otherwise."""
    if name not in REGISTERED:
        raise ConfigError(f"unknown method {name!r}; choose from {sorted(REGISTERED)}")
    return REGISTERED[name]


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
    return MethodSection(name, build_config(name, options), get_method(name))


def build_method(spec: Mapping[str, Any], backbone) -> Any:
    """``{"name": "diffusion-dpo", "beta": 5000, ...}`` (or a :class:`MethodSection`) → the method
    on ``backbone`` (an image backbone, or a causal LM for text methods)."""
    return method_section(spec).build(backbone)


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """A whole recipe from its sections, checked (a :class:`ConfigError` names the field); the ``method``
    section (default ``diffusion-dpo``) becomes the method's typed config."""
    unknown = set(raw) - {"model", "data", "train", "method", "eval"}
    if unknown:
        raise ConfigError(f"unknown recipe section(s) {sorted(unknown)}; expected model, data, train, method, eval")
    method = raw.get("method") or {}
    if not isinstance(method, Mapping):
        raise ConfigError(f"the method section must be a mapping with a 'name', not {method!r}")
    return Recipe(
        method=method_section({"name": "diffusion-dpo", **method}),
        model=build_section(ModelConfig, raw.get("model") or {}, "model"),
        data=build_section(DataConfig, raw.get("data") or {}, "data"),
        train=build_section(TrainConfig, raw.get("train") or {}, "train"),
        eval=dict(raw.get("eval") or {}),
    )


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (a path or a bundled recipe's name, :func:`~diffalign.recipes.resolve_recipe`;
    or start empty with ``None``), apply dotted overrides and check the whole of it (a
    :class:`ConfigError`, before any model loads); the ``method`` section becomes the method's typed
    config."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_recipe(path)
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {path} must be a YAML mapping of sections")
    return recipe_from_dict(apply_overrides(raw, overrides or []))


def trainer_for(kind: str) -> Callable[[Recipe], Path]:
    """The ``train(recipe) -> run dir`` function that runs methods of ``kind``."""
    if kind not in TRAINERS:
        raise ValueError(f"unknown method kind {kind!r}; choose from {sorted(KINDS)}")
    return TRAINERS[kind]


def run_recipe(recipe: Recipe) -> Path:
    """Train ``recipe`` with the trainer of its method's kind; returns the run directory."""
    return trainer_for(recipe.method.kind)(recipe)


__all__ = ["KINDS", "MethodEntry", "TRAINERS", "build_config", "build_method", "get_method", "load_recipe",
           "method_section", "methods", "recipe_from_dict", "register_method", "run_recipe", "trainer_for"]
