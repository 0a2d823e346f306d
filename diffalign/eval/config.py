"""An evaluation recipe: one dataclass per section of ``pipelines/eval-*.yaml``.

```yaml
model:      {pretrained: stabilityai/stable-diffusion-xl-base-1.0, dtype: fp16}
compare:    {lora: runs/sdxl-dpo/final}      # optional: a second model, same prompts and seeds
prompts:    {name: partiprompts, limit: null}
generation: {images_per_prompt: 4, num_inference_steps: 50, guidance_scale: 7.5}
scoring:    {rewards: [pickscore, hpsv2.1]}
output:     {dir: runs/eval-sdxl-parti}
```

Any field can be overridden on the command line as ``--generation.num_inference_steps=20``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelSpec:
    """A model to sample from (or a folder of its images).

    Attributes:
        pretrained: hub id, local diffusers folder or ``bundled:NAME`` (a model shipped in the package).
            In ``compare``, empty means "the same as ``model``" (with its family, dtype, scheduler).
        lora: a LoRA in diffusers format (a run's ``final/`` folder, a file or a hub id).
        finetuned: a folder holding a fine-tuned ``unet/`` or ``transformer/`` (a full fine-tune's ``final/``).
        family: ``sd``, ``sdxl`` or ``sd3``; detected from ``model_index.json`` when ``None``.
        scheduler: a diffusers scheduler class name to sample with instead of the model's own.
        dtype: ``fp32``, ``fp16`` or ``bf16`` (``None``: as saved, usually fp32).
        variant, revision: passed to ``from_pretrained`` (e.g. ``variant: fp16``).
        images: an already generated folder in GenEval's layout: scored, not generated.
        name: the label in the report (default: built from the fields above).
        allow_pickle: also load pickled (``.bin``) model and LoRA weights; by default only safetensors load,
            since unpickling a file can run code.
    """

    pretrained: str = ""
    lora: str | None = None
    finetuned: str | None = None
    family: str | None = None
    scheduler: str | None = None
    dtype: str | None = None
    variant: str | None = None
    revision: str | None = None
    images: str | None = None
    name: str | None = None
    allow_pickle: bool = False

    @property
    def is_set(self) -> bool:
        """Whether this spec names a model or a folder of images."""
        return bool(self.pretrained or self.lora or self.finetuned or self.images)

    def label(self) -> str:
        """``name``, else ``<model>[ + LoRA <folder>][ + <finetuned>]`` from the last path parts."""
        if self.name:
            return self.name
        if not (self.pretrained or self.lora or self.finetuned) and self.images:
            return _short(self.images)
        text = _short(self.pretrained)
        if self.lora:
            run = training_run(self.lora)
            text += (f" + {run['method']} LoRA ({_short(run['run'])})" if run and run.get("method")
                     else f" + LoRA {_short(self.lora)}")
        if self.finetuned:
            text += f" + {_short(self.finetuned)}"
        return text


def training_run(path: str | None) -> dict[str, Any] | None:
    """The key settings of the diffalign run that wrote ``path`` (a run's ``final/``: its ``config.yaml``
    is one folder up): method, β, learning rate, steps, batch, LoRA rank, data source; None when ``path``
    is not such a folder (a hub id, a file, another tool's LoRA)."""
    if not path:
        return None
    folder = Path(path)
    run = folder.parent if folder.name == "final" else folder
    config = run / "config.yaml"
    if not config.is_file():
        return None
    try:
        raw = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError:
        return None
    method, train, model = raw.get("method") or {}, raw.get("train") or {}, raw.get("model") or {}
    out = {"run": str(run), "method": method.get("name"), "beta": method.get("beta"),
           "learning_rate": train.get("learning_rate"), "max_steps": train.get("max_steps"),
           "batch_size": train.get("batch_size"), "gradient_accumulation_steps": train.get("gradient_accumulation_steps"),
           "lora_rank": model.get("lora_rank"), "base_model": model.get("pretrained"),
           "data": (raw.get("data") or {}).get("source"), "seed": train.get("seed")}
    card = folder / "README.md"
    if card.is_file():
        import re

        m = re.search(r"for (\d+) optimizer steps", card.read_text())
        if m:
            out["steps"] = int(m.group(1))
    return {k: v for k, v in out.items() if v is not None}


def _short(path: str) -> str:
    """The last one or two parts of a path or hub id (``runs/dpo/final`` → ``dpo/final``)."""
    parts = [p for p in str(path).replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:]) if parts else str(path)


@dataclass
class PromptsConfig:
    """Which prompts.

    Attributes:
        name: a prompt set of :data:`diffalign.eval.prompts.PROMPT_SETS` (``file`` for your own
            ``.txt``/``.jsonl``).
        path: a local copy of the set's file(s), or the ``file`` to read; ``None`` downloads the pinned file.
        limit: at most this many prompts per category (the first in upstream order); for sets
            without categories, the first ``limit`` prompts. ``None``: all.
        options: keyword arguments of the set's loader (``n_per_task``, ``seed`` for ``shapes``;
            ``split`` for ``pickapic-test``).
        cache_dir: where downloaded prompt files are kept (default ``~/.cache/diffalign/benchmarks``).
    """

    name: str = "shapes"
    path: str | None = None
    limit: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None


@dataclass
class GenerationConfig:
    """How images are sampled (the same for both models of a paired run).

    Attributes:
        images_per_prompt: images per prompt (GenEval: 4).
        num_inference_steps, guidance_scale: sampler steps and classifier-free guidance.
        height, width: ``None`` = the model's default resolution.
        seed: the base seed; image ``j`` of prompt ``i`` uses ``seed + 10000·i + j``.
        batch_size: images per pipeline call.
        negative_prompt: one negative prompt for every image (``None``: the pipeline's default).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda:1``, ...
    """

    images_per_prompt: int = 4
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    height: int | None = None
    width: int | None = None
    seed: int = 0
    batch_size: int = 8
    negative_prompt: str | None = None
    device: str = "auto"


@dataclass
class ScoringConfig:
    """How images are scored.

    Attributes:
        rewards: reward names from the registry (:func:`diffalign.rewards.list_rewards`) or folders
            holding a ``reward.yaml``.
        reward_options: keyword arguments per reward, e.g. ``{pickscore: {weights: /models/PickScore}}``.
        geneval_detector: the GenEval protocol's detector for prompts with GenEval metadata:
            ``auto`` (the Shapes segmenter for the ``shapes`` set, otherwise none), ``none``,
            ``shapes``, or ``transformers:<hub id or folder>`` (an object detector; results are
            labelled non-official).
        color_weights: open_clip weights of GenEval's colour classifier (``None``: the ``openai``
            ``ViT-L-14-quickgelu`` weights GenEval used); unused by the Shapes segmenter.
        breakdowns: per-category tables, by ``category`` and/or metadata fields (``Challenge``).
        n_boot: bootstrap resamples for the paired confidence intervals.
        batch_size: images per reward forward pass.
        device: ``auto``, ``cpu``, ``cuda``, ...
        allow_pickle: also load pickled (``.pt``/``.bin``) reward checkpoints; by default only safetensors
            load, since unpickling a file can run code (``--allow-pickle``).
    """

    rewards: list[str] = field(default_factory=list)
    reward_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    geneval_detector: str = "auto"
    color_weights: str | None = None
    breakdowns: list[str] = field(default_factory=lambda: ["category"])
    n_boot: int = 2000
    batch_size: int = 16
    device: str = "auto"
    allow_pickle: bool = False


@dataclass
class OutputConfig:
    """Where results go and what the report shows.

    Attributes:
        dir: the run folder: ``model/`` and ``compare/`` (GenEval layout), ``results.json``,
            ``scores.jsonl``, ``report.html``.
        grid_prompts: prompts shown as image grids in the report (spread over the categories).
        grid_samples: images per prompt shown in a grid.
    """

    dir: str = "runs/eval"
    grid_prompts: int = 12
    grid_samples: int = 4


@dataclass
class EvalConfig:
    """A whole evaluation: the model, an optional model to compare with, prompts, sampling, scoring, output."""

    model: ModelSpec = field(default_factory=ModelSpec)
    compare: ModelSpec = field(default_factory=ModelSpec)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def compare_spec(self) -> ModelSpec | None:
        """The second model with the first's fields filled in where it leaves them empty, or None."""
        if not self.compare.is_set:
            return None
        c = dataclasses.replace(self.compare)
        if not c.pretrained and not c.images:
            for name in ("pretrained", "family", "scheduler", "dtype", "variant", "revision"):
                if getattr(c, name) is None or getattr(c, name) == "":
                    setattr(c, name, getattr(self.model, name))
        return c

    def to_dict(self) -> dict[str, Any]:
        """The recipe as nested dicts (what ``OUT/config.yaml`` holds)."""
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {"model": ModelSpec, "compare": ModelSpec, "prompts": PromptsConfig,
                             "generation": GenerationConfig, "scoring": ScoringConfig, "output": OutputConfig}


def _coerce(value: Any, text: str, where: str) -> Any:
    """YAML and overrides give strings for ``1e-5`` or ``a,b``: coerce them to the field's type."""
    if value is None or not isinstance(value, str):
        if isinstance(value, int) and not isinstance(value, bool) and text.startswith("float"):
            return float(value)
        return value
    base = text.split(" |")[0]
    try:
        if base == "int":
            return int(value)
        if base == "float":
            return float(value)
    except ValueError:
        raise ValueError(f"{where} must be a number, not {value!r}") from None
    if base.startswith("list["):
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def _section(cls: type, values: Any, where: str):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"section '{where}' must be a mapping, got {type(values).__name__}")
    hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}  # annotations are strings here
    names = set(hints)
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in section '{where}'; known: {sorted(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def eval_config_from_dict(raw: dict[str, Any]) -> EvalConfig:
    """An :class:`EvalConfig` from nested dicts; unknown sections or keys are errors naming them."""
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown eval recipe section(s) {unknown}; expected {', '.join(SECTIONS)}")
    cfg = EvalConfig(**{name: _section(cls, raw.get(name), name) for name, cls in SECTIONS.items()})
    if not cfg.model.is_set:
        raise ValueError("no model to evaluate: set model.pretrained (or --model), or model.images for a folder "
                         "of images")
    return cfg


def load_eval_config(path: str | Path | None, overrides: list[str] | None = None) -> EvalConfig:
    """Read an eval recipe (a path or a bundled recipe's name, e.g. ``eval-shapes``; or start from the defaults
    with ``None``) and apply ``section.key=value`` overrides."""
    from diffalign.recipes import apply_overrides, resolve_recipe

    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_recipe(path)
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"eval recipe {path} must be a YAML mapping of sections")
    return eval_config_from_dict(apply_overrides(raw, overrides or []))
