"""Run configuration: one dataclass per section, a recipe is a YAML file with these sections.

```yaml
model:  {pretrained: runwayml/stable-diffusion-v1-5, lora_rank: 8}
data:   {source: data/pickapic/*.parquet, resolution: 512}
method: {name: diffusion-dpo, beta: 5000}
train:  {output_dir: runs/sd15-dpo, max_steps: 2000, learning_rate: 1.0e-5}
```

Any field can be overridden on the command line as ``--train.max_steps=10``. Each method's own knobs
live in its config dataclass (``DiffusionDPOConfig``, ``MaPOConfig``, ...) in its module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffalign.recipes import apply_overrides, resolve_recipe


@dataclass
class ModelConfig:
    """The backbone to align.

    Attributes:
        pretrained: hub id or local folder of a diffusers pipeline (SD1.x/2.x, SDXL, SD3).
        family: ``sd``, ``sdxl`` or ``sd3``; detected from ``model_index.json`` when ``None``.
        lora_rank: LoRA rank on the denoiser's attention projections; ``0`` = full fine-tune
            (a frozen copy is kept as the reference).
        lora_alpha: LoRA alpha (defaults to the rank, as diffusers' DPO scripts do).
        lora_target_modules: module names to adapt; ``None`` = the family's default.
        gradient_checkpointing: trade compute for memory in the denoiser.
        revision, variant: passed to ``from_pretrained``.
    """

    pretrained: str = ""
    family: str | None = None
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_target_modules: list[str] | None = None
    gradient_checkpointing: bool = False
    revision: str | None = None
    variant: str | None = None


@dataclass
class DataConfig:
    """Where the training data comes from and how images are prepared.

    Attributes:
        source: local parquet file/dir/glob, a JSONL file, or a hub dataset id.
        format: ``pickapic`` (``jpg_0``/``jpg_1``/``label_0``/``caption``), ``jsonl``
            (``prompt``/``chosen``/``rejected``), ``feedback`` (per-image like/dislike, for KTO), or
            ``ranked`` (ranked lists of images per prompt from ``diffalign data label``, for RankDPO).
        split: dataset split for hub ids.
        resolution: training resolution (shortest side resized, then cropped square).
        center_crop: center crop (else random crop); random_flip: flip both images of a pair together.
        drop_ties: drop ``label_0 == 0.5`` pairs (official Diffusion-DPO does; 12% of Pick-a-Pic v2).
        strict: an undecodable image is an error instead of a skipped, counted row.
        max_samples: use only the first N pairs (after filtering).
        caption_dropout: probability of training on the empty prompt (official Diffusion-DPO: 0.2).
        cache_dir: where VAE latents and text embeddings are cached; ``None`` = ``<output_dir>/cache``;
            ``""`` disables the cache.
        num_workers: image decoding workers.
    """

    source: str | list[str] = ""
    format: str = "pickapic"
    split: str = "train"
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    drop_ties: bool = True
    strict: bool = False
    max_samples: int | None = None
    caption_dropout: float = 0.0
    cache_dir: str | None = None


@dataclass
class TrainConfig:
    """The shared training loop's knobs.

    ``batch_size`` is per process, in pairs (or samples for KTO/SFT); the effective batch is
    ``batch_size × gradient_accumulation_steps × num_processes``.

    ``report_to``: experiment trackers, as accelerate's ``log_with``: ``None``/``"none"`` (default:
    ``metrics.jsonl`` only, nothing leaves the machine), ``"tensorboard"``, ``"wandb"``, another
    accelerate tracker name, a list of them (or a comma-separated string), or ``"all"``. Every
    ``metrics.jsonl`` row goes to them at its step; the logs live in ``<output_dir>/logs/``.
    """

    output_dir: str = "runs/run"
    seed: int = 0
    max_steps: int = 1000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    use_8bit_adam: bool = False
    mixed_precision: str = "no"
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    validation_steps: int = 0
    validation_prompts: list[str] = field(default_factory=list)
    validation_num_inference_steps: int = 25
    validation_guidance_scale: float = 5.0
    max_nonfinite_steps: int = 5
    resume: str | None = None
    log_every: int = 1
    report_to: str | list[str] | None = None


@dataclass
class Recipe:
    """A whole run: model, data, method (``name`` plus that method's knobs), training loop."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "diffusion-dpo"})
    eval: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _build(cls, values: dict[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in section '{where}'; known: {sorted(fields)}")
    values = dict(values)
    for name, value in values.items():
        # YAML reads "1e-5" (no dot) as a string: coerce strings for numeric fields
        if isinstance(value, str) and str(fields[name].type).split(" |")[0] in ("float", "int"):
            try:
                values[name] = float(value) if "float" in str(fields[name].type) else int(value)
            except ValueError:
                raise ValueError(f"{where}.{name} must be a number, not {value!r}") from None
    return cls(**values)


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    unknown = set(raw) - {"model", "data", "train", "method", "eval"}
    if unknown:
        raise ValueError(f"unknown recipe section(s) {sorted(unknown)}; expected model, data, train, method, eval")
    method = dict(raw.get("method") or {})
    method.setdefault("name", "diffusion-dpo")
    return Recipe(
        model=_build(ModelConfig, raw.get("model") or {}, "model"),
        data=_build(DataConfig, raw.get("data") or {}, "data"),
        train=_build(TrainConfig, raw.get("train") or {}, "train"),
        method=method,
        eval=dict(raw.get("eval") or {}),
    )


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> Recipe:
    """Read a recipe YAML (a path or a bundled recipe's name, :func:`resolve_recipe`; or start empty with
    ``None``) and apply dotted overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = resolve_recipe(path)
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"recipe {path} must be a YAML mapping of sections")
    return recipe_from_dict(apply_overrides(raw, overrides or []))
