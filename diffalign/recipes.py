"""Recipe files, for ``diffalign train`` and ``diffalign eval`` alike: find a recipe by path or by the name of
one shipped with diffalign, and apply ``--section.key=value`` overrides to its sections.

What the sections mean is the reader's business (:mod:`diffalign.trainers.config` for training,
:mod:`diffalign.eval.config` for evaluation); this module knows only files and dotted keys.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from diffalign.errors import UsageError

BUNDLED_RECIPES = Path(__file__).resolve().parent / "pipelines"  # the repository's pipelines/, in the wheel too


class RecipeNotFound(UsageError, FileNotFoundError):
    """No recipe file of that path or bundled name."""


def resolve_recipe(path: str | Path) -> Path:
    """A recipe file: ``path`` itself if it exists, else a recipe shipped with diffalign named by its bare
    name, with or without ``.yaml`` (``shapes-mapo``, ``sdxl-diffusion-dpo.yaml``); a
    ``FileNotFoundError`` otherwise."""
    path = Path(path)
    if path.is_file():
        return path
    if path.parent == Path("."):
        for name in (path.name, f"{path.name}.yaml"):
            if (BUNDLED_RECIPES / name).is_file():
                return BUNDLED_RECIPES / name
    raise RecipeNotFound(f"recipe {path} does not exist (nor is it one of the bundled recipes: "
                            f"{', '.join(sorted(p.stem for p in BUNDLED_RECIPES.glob('*.yaml')))})")


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's booleans: only ``true`` / ``false`` (any case) are booleans.
    YAML 1.1 also reads ``yes``/``no``/``on``/``off`` as booleans, so ``--train.mixed_precision=no``
    became ``False``; here it stays the string ``"no"`` (and ``yes`` for a boolean field is an error
    naming the field, not a silent ``True``)."""


RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                   list("tTfF"))


def load_yaml(text: str) -> Any:
    """``text`` parsed as YAML with :class:`RecipeLoader` (safe; only true/false are booleans)."""
    return yaml.load(text, Loader=RecipeLoader)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML, :func:`load_yaml`) to a nested dict, in place."""
    for item in overrides:
        item = item.removeprefix("--")
        if "=" not in item:
            raise UsageError(f"override {item!r} must look like --section.key=value")
        dotted, value = item.split("=", 1)
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise UsageError(f"override {item!r}: {p!r} is not a section")
        node[leaf] = load_yaml(value) if value != "" else ""
    return raw
