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
any model loads), and runs a recipe on the one training loop (:func:`run_recipe`).
Imports run one way: ``cli → registry → engine (loop, online, ...) → core / objectives → models``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# every module that defines methods: their decorators fill the table
import diffalign.text.methods  # noqa: F401
import diffalign.trainers.adv_grpo  # noqa: F401
import diffalign.trainers.awm  # noqa: F401
import diffalign.trainers.dcpo  # noqa: F401
import diffalign.trainers.dgpo  # noqa: F401
import diffalign.trainers.dpo  # noqa: F401
import diffalign.trainers.flow_grpo_variants  # noqa: F401
import diffalign.trainers.inpo  # noqa: F401
import diffalign.trainers.inversion_dpo  # noqa: F401
import diffalign.trainers.kto  # noqa: F401
import diffalign.trainers.mapo  # noqa: F401
import diffalign.trainers.nft  # noqa: F401
import diffalign.trainers.ppd  # noqa: F401
import diffalign.trainers.prdp  # noqa: F401
import diffalign.trainers.rankdpo  # noqa: F401
import diffalign.trainers.sft  # noqa: F401
import diffalign.trainers.smpo  # noqa: F401
import diffalign.trainers.tpo  # noqa: F401
from diffalign.recipes import apply_overrides, load_yaml, resolve_recipe
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
    recipe = Recipe(
        method=method_section({"name": "diffusion-dpo", **method}),
        model=build_section(ModelConfig, raw.get("model") or {}, "model"),
        data=build_section(DataConfig, raw.get("data") or {}, "data"),
        train=build_section(TrainConfig, raw.get("train") or {}, "train"),
        eval=dict(raw.get("eval") or {}),
    )
    check_ties(recipe)
    return recipe


def uses_ties(entry: MethodEntry) -> bool:
    """Whether the method declares that its loss uses tied pairs (``uses_ties = True`` on its class)."""
    return bool(getattr(entry.method_class, "uses_ties", False))


def check_ties(recipe: Recipe) -> None:
    """``data.drop_ties: false`` keeps Pick-a-Pic's ties (``label_0 = 0.5``) in the data; a method whose
    loss has no use for a tie would train each as "image 0 wins". Such a recipe is a :class:`ConfigError`
    unless the method declares ``uses_ties``."""
    d = recipe.data
    if d.drop_ties or d.format != "pickapic" or not d.source or uses_ties(recipe.method.entry):
        return
    users = sorted(name for name, entry in REGISTERED.items() if uses_ties(entry))
    raise ConfigError(f"data.drop_ties is false, but method {recipe.method.name!r} cannot use a tie (label_0 = 0.5): "
                      "each would train as 'image 0 wins'; keep data.drop_ties: true (the default), or use a method "
                      f"that uses ties ({', '.join(users) if users else 'no registered method does yet'})")


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (a path or a bundled recipe's name, :func:`~diffalign.recipes.resolve_recipe`;
    or start empty with ``None``), apply dotted overrides and check the whole of it (a
    :class:`ConfigError`, before any model loads); the ``method`` section becomes the method's typed
    config."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_recipe(path)
        raw = load_yaml(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {path} must be a YAML mapping of sections")
    return recipe_from_dict(apply_overrides(raw, overrides or []))


def run_recipe(recipe: Recipe) -> Path:
    """Train ``recipe`` on the one training loop (:func:`diffalign.trainers.loop.train`; the method's kind
    and hooks decide its model, batch source and step source); returns the run directory."""
    return loop.train(recipe)


def plan(recipe: Recipe) -> str:
    """What ``diffalign train RECIPE --dry-run`` prints: the method and its trainer, the model and data it
    would read (each path checked: a local folder or file must exist; a hub id is looked up in the local
    Hugging Face cache only), the optimisation and the run directory. Loads no model and reads no data;
    a missing local model or data file is a :class:`UsageError` after the plan is printed."""
    import glob

    from diffalign.models.loading import resolve_pretrained

    m, d, t = recipe.model, recipe.data, recipe.train
    problems: list[str] = []
    lines = [f"method   {recipe.method.name} ({recipe.method.kind}: {KINDS[recipe.method.kind]})",
             f"         {', '.join(f'{k}={v!r}' for k, v in recipe.method.to_dict().items() if k != 'name')}"]

    def hub_cached(repo: str, filename: str) -> bool:
        try:
            from huggingface_hub import try_to_load_from_cache

            return isinstance(try_to_load_from_cache(repo, filename, revision=m.revision), str)
        except Exception:  # noqa: BLE001 - a malformed id: not cached
            return False

    try:
        where = resolve_pretrained(m.pretrained) if m.pretrained else ""
    except FileNotFoundError as e:
        where, _ = "", problems.append(str(e))
    index = "config.json" if recipe.method.kind == "text" else "model_index.json"
    if not m.pretrained:
        problems.append("model.pretrained is empty")
        model_state = "(none)"
    elif Path(where).exists():
        model_state = "local folder" if (Path(where) / index).is_file() else f"local path without {index}"
        if not (Path(where) / index).is_file():
            problems.append(f"model.pretrained {where}: no {index} there")
    elif where.count("/") == 1 and not where.startswith((".", "/")):
        model_state = ("hub id, in the local Hugging Face cache" if hub_cached(where, index)
                       else "hub id, not in the local cache: it would be downloaded")
    else:
        model_state = "neither a local folder nor a hub id"
        problems.append(f"model.pretrained {m.pretrained!r} does not exist")
    lines.append(f"model    {m.pretrained} ({model_state}); "
                 + (f"LoRA rank {m.lora_rank}" if m.lora_rank else "full fine-tune (a frozen copy as the reference)"))
    sources = [] if not d.source else ([d.source] if isinstance(d.source, str) else list(d.source))
    if sources:
        for src in sources:
            found = sorted(glob.glob(src)) if any(c in src for c in "*?[") else ([src] if Path(src).exists() else [])
            if found:
                lines.append(f"data     {src}: {len(found)} file(s)/folder(s), format {d.format}")
            elif src.count("/") == 1 and not Path(src).suffix and not src.startswith((".", "/")):
                lines.append(f"data     {src}: a hub dataset id (read with `datasets`), format {d.format}")
            else:
                lines.append(f"data     {src}: nothing there")
                problems.append(f"data.source {src}: no such file or folder")
    else:
        lines.append("data     (none: " + ("the method samples its own" if recipe.method.kind in ("online", "backprop")
                                          else "data.source is empty") + ")")
        if recipe.method.kind not in ("online", "backprop"):
            problems.append("data.source is empty")
    eff = f"{t.batch_size} x {t.gradient_accumulation_steps} accumulation x processes"
    lines.append(f"train    {t.max_steps} steps, batch {eff}, lr {t.learning_rate:g} ({t.lr_scheduler}, "
                 f"{t.lr_warmup_steps} warm-up), mixed precision {t.mixed_precision}, seed {t.seed}")
    out_dir = Path(t.output_dir)
    state = (f"exists ({len(list(out_dir.iterdir()))} entries)" if out_dir.is_dir() and any(out_dir.iterdir())
             else "new")
    lines.append(f"output   {out_dir} ({state}); checkpoints every {t.checkpointing_steps or 'never'}; "
                 f"trackers: {t.report_to or 'none'}" + (f"; resume {t.resume}" if t.resume else ""))
    text = "\n".join(lines)
    if problems:
        print(text)
        raise ConfigError("dry run: " + "; ".join(problems))
    return text + "\ndry run: the recipe is valid and its paths exist; nothing was trained"


__all__ = ["KINDS", "MethodEntry", "build_config", "build_method", "get_method", "load_recipe",
           "method_section", "methods", "plan", "recipe_from_dict", "register_method", "run_recipe"]
