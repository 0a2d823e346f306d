"""Run configuration: one dataclass per section, a recipe is a YAML file with these sections.

```yaml
model:  {pretrained: runwayml/stable-diffusion-v1-5, lora_rank: 8}
data:   {source: data/pickapic/*.parquet, resolution: 512}
method: {name: diffusion-dpo, beta: 5000}
train:  {output_dir: runs/sd15-dpo, max_steps: 2000, learning_rate: 1.0e-5}
```

Any field can be overridden on the command line as ``--train.max_steps=10``. Each method's own knobs
live in its config dataclass (``DiffusionDPOConfig``, ``MaPOConfig``, ...) in its module, registered
with the method. :func:`diffalign.trainers.registry.load_recipe` checks a recipe whole when it loads,
before any model loads: unknown keys or options, wrong types and out-of-range values (:data:`RANGES`)
are one :class:`ConfigError` naming the field; the ``method`` section becomes a :class:`MethodSection`
with the method's typed config. This module holds the sections and the checks; it knows no method.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from diffalign.errors import UsageError


class ConfigError(UsageError):
    """A recipe that cannot run as written: an unknown key or option, a wrong type, a value out of range."""


@dataclass
class ModelConfig:
    """The backbone to align.

    Attributes:
        pretrained: hub id or local folder of a diffusers pipeline (SD1.x/2.x, SDXL, SD3, Wan, Qwen-Image, Z-Image,
            FLUX.1).
        family: ``sd``, ``sdxl``, ``sd3``, ``wan``, ``qwen-image``, ``z-image`` or ``flux``; detected from
            ``model_index.json`` when ``None``.
        lora_rank: LoRA rank on the denoiser's attention projections; ``0`` = full fine-tune
            (a frozen copy is kept as the reference).
        lora_alpha: LoRA alpha (defaults to the rank, as diffusers' DPO scripts do).
        lora_target_modules: module names to adapt; ``None`` = the family's default.
        gradient_checkpointing: trade compute for memory in the denoiser.
        revision, variant: passed to ``from_pretrained``.
        allow_pickle: also load pickled (``.bin``) weights; by default only safetensors load, since
            unpickling a file can run code (``--allow-pickle``).
        channels_last: keep the VAE, and a LoRA-trained convolutional UNet, in channels-last memory
            format (faster convolutions on CPUs and on GPUs in fp16/bf16; not under FSDP/DeepSpeed, nor for
            a fully fine-tuned or transformer denoiser).
        embedded_guidance: the guidance-embedding input of a guidance-distilled transformer (FLUX.1-dev) in the
            forward passes no sampler sets (every step of an off-line method); ``None`` = the family's default
            (3.5, diffusers' FLUX script; 1.0 is common for SFT). On-line methods feed ``method.guidance_scale``.
            Refused for a model without a guidance embedding.
    """

    pretrained: str = ""
    family: str | None = None
    lora_rank: int = 8
    lora_alpha: float | None = None
    lora_target_modules: list[str] | None = None
    gradient_checkpointing: bool = False
    revision: str | None = None
    variant: str | None = None
    allow_pickle: bool = False
    channels_last: bool = True
    embedded_guidance: float | None = None


@dataclass
class DataConfig:
    """Where the training data comes from and how images are prepared.

    Attributes:
        source: parquet files (a file, a directory in the Hub's layout, a glob, or a list), WebDataset
            ``.tar`` shards, a JSONL file, a ``save_to_disk`` folder, a hub dataset id (downloaded once,
            memory-mapped), or (from Python) a ``datasets.Dataset``. Rows are read when a step needs them.
        format: ``pickapic`` (``jpg_0``/``jpg_1``/``label_0``/``caption``), ``jsonl``
            (``prompt``/``chosen``/``rejected``), ``feedback`` (per-image like/dislike, for KTO), or
            ``ranked`` (ranked lists of images per prompt from ``diffalign data label``, for RankDPO).
        split: dataset split for hub ids.
        resolution: training resolution (shortest side resized, then cropped square).
        center_crop: center crop (else random crop).
        random_flip: flip both images of a pair together.
        drop_ties: drop ``label_0 == 0.5`` pairs (official Diffusion-DPO does; 12% of Pick-a-Pic v2).
            ``false`` is refused for a method that cannot use a tie (one without ``uses_ties``).
        strict: a bad row (undecodable or missing image, bad label, empty caption) is an error naming file,
            row and field, instead of a skipped, counted row.
        max_samples: use only the first N rows of the source.
        caption_dropout: probability of training on the empty prompt (official Diffusion-DPO: 0.2).
        cache_dir: where VAE latents and text embeddings are cached; ``None`` = ``<output_dir>/cache``;
            ``""`` disables the cache.
        max_bad_fraction: stop when more than this share of the rows read was skipped as bad (judged once
            100 rows, or the whole of a smaller set, have been read; ties do not count; each skip is counted,
            printed after the first step and logged as ``data/skipped_<reason>``; ``strict`` stops at the first).
        num_workers: DataLoader worker processes that read, decode, crop and render the examples ahead of
            the step (0: in the training process). The batches are the same for any number.
        prefetch_factor: micro-batches each worker reads ahead.
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
    max_bad_fraction: float = 0.2
    num_workers: int = 0
    prefetch_factor: int = 2


@dataclass
class TrainConfig:
    """The shared training loop's knobs.

    Attributes:
        output_dir: the run directory (config.yaml, metrics.jsonl, checkpoints/, final/).
        seed: the run's seed: data order, placements, noise and timesteps are functions of it and the
            run position alone.
        max_steps: optimizer steps.
        batch_size: per process, in pairs (or samples for KTO/SFT); the effective batch is
            ``batch_size × gradient_accumulation_steps × num_processes``.
        gradient_accumulation_steps: micro-batches per optimizer step.
        learning_rate: AdamW's learning rate (the peak of the schedule).
        lr_scheduler: a diffusers ``get_scheduler`` name (``constant_with_warmup``, ``cosine``, ``linear``...).
        lr_warmup_steps: linear warm-up steps of the schedule.
        adam_beta1, adam_beta2, adam_epsilon, weight_decay: AdamW's.
        max_grad_norm: gradient clipping norm.
        ema_decay: keep an exponential moving average of the trainable weights at this decay (0: off;
            Flow-GRPO and DiffusionNFT use 0.9, diffusers' scripts' ``--use_ema`` 0.9999): checkpoints'
            diffusers-format weights, validation and ``final/`` are the average, training uses the
            weights themselves (:mod:`diffalign.trainers.ema`). Not under FSDP / DeepSpeed.
        use_8bit_adam: bitsandbytes' 8-bit AdamW (``pip install 'diffalign[bnb]'``).
        mixed_precision: ``no``, ``fp16``, ``bf16`` or ``fp8`` (accelerate's; ``--train.mixed_precision=no``
            is the string ``"no"``: recipes read only ``true``/``false`` as booleans).
        checkpointing_steps: write ``checkpoints/step-N`` every N steps (0: never).
        checkpoints_total_limit: keep only the newest N checkpoints (``None``: all).
        validation_steps: sample ``validation_prompts`` every N steps (0: never).
        validation_prompts: prompts of the validation images.
        validation_num_inference_steps, validation_guidance_scale: the validation sampler's.
        max_nonfinite_steps: stop after this many non-finite losses in a row (each is skipped).
        resume: ``latest`` (the newest checkpoint that reads; a damaged one is skipped, with a note) or a
            checkpoint folder to continue from. The lr schedule continues as this recipe gives it at the
            resumed step (a longer ``max_steps`` extends a cosine; it does not restart at lr 0).
        overwrite: replace an earlier run in ``output_dir`` (its latent cache is kept); without it (or
            ``resume``) a run directory that holds a run is refused.
        report_to: experiment trackers, as accelerate's ``log_with``: ``None``/``"none"`` (default:
            ``metrics.jsonl`` only, nothing leaves the machine), ``"tensorboard"``, ``"wandb"``, another
            accelerate tracker name, a list of them (or a comma-separated string), or ``"all"``. Every
            ``metrics.jsonl`` row goes to them at its step; the logs live in ``<output_dir>/logs/``.
        push_to_hub: after the run, upload ``final/`` (weights and its ``README.md`` model card) to the
            Hugging Face Hub (``HfApi.create_repo`` + ``upload_folder``; the token is huggingface_hub's own:
            ``HF_TOKEN`` or ``huggingface-cli login``). Off by default: nothing leaves the machine.
        hub_model_id: the Hub repository (``name`` or ``owner/name``); ``None``: the run directory's name
            (TRL's and diffusers' name and default).
        hub_private_repo: create the repository private (``None``: the Hub's default, public unless the
            organisation says otherwise), as in TRL.
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
    ema_decay: float = 0.0
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
    overwrite: bool = False
    report_to: str | list[str] | None = None
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_private_repo: bool | None = None


class MethodSection(Mapping):
    """A recipe's ``method`` section: the method's ``name`` and its typed ``config`` (every option,
    defaults included).

    It reads like the mapping it was written as: ``section["name"]``, ``section["beta"]``,
    ``section.get("beta")``, and ``dict(section)`` is ``{"name": ..., **every option}``.
    """

    def __init__(self, name: str, config: Any, entry: Any):
        self.name = name
        self.config = config
        self.entry = entry  # the registered method (trainers.method.MethodEntry): its class and kind
        self._fields = tuple(f.name for f in dataclasses.fields(config))

    @property
    def kind(self) -> str:
        """The kind of step the method needs (``offline``, ``online``, ``backprop``, ``video``, ``text``)."""
        return self.entry.kind

    def build(self, backbone) -> Any:
        """The method on ``backbone`` (an image backbone or a causal LM) with a copy of this config (the
        recipe stays as loaded, for ``config.yaml``)."""
        import copy

        return self.entry.method_class(copy.deepcopy(self.config), backbone)

    def __getitem__(self, key: str) -> Any:
        if key == "name":
            return self.name
        if key in self._fields:
            return getattr(self.config, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        yield "name"
        yield from self._fields

    def __len__(self) -> int:
        return 1 + len(self._fields)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self.config)}

    def __repr__(self) -> str:
        return f"MethodSection({self.name!r}, {self.config!r})"


@dataclass
class Recipe:
    """A whole run: model, data, method (``name`` plus that method's typed knobs), training loop.

    Built by :func:`diffalign.trainers.registry.load_recipe` (or ``recipe_from_dict``), which turns the
    ``method`` mapping into its :class:`MethodSection`.
    """

    method: MethodSection
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.method, MethodSection):
            raise TypeError("Recipe.method is a MethodSection: build recipes with "
                            "diffalign.trainers.registry.load_recipe / recipe_from_dict")

    def to_dict(self) -> dict[str, Any]:
        """Every section resolved, each default written out (what ``config.yaml`` holds)."""
        return {"model": dataclasses.asdict(self.model), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train), "method": self.method.to_dict(), "eval": dict(self.eval)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def field_docs(cls) -> dict[str, str]:
    """``{field name: its doc}`` from the ``Attributes:`` section of a config dataclass's docstring (a line
    ``name: text`` or ``a, b: text``, continued by deeper-indented lines)."""
    import inspect

    docs: dict[str, str] = {}
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Attributes:") + 1
    except StopIteration:
        return docs
    current: list[str] = []
    indent = None
    for line in lines[start:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break
        head, sep, text = line.strip().partition(": ")
        names = [n.strip() for n in head.split(",")]
        if depth == indent and sep and all(n.isidentifier() for n in names):
            current = names
            for n in names:
                docs[n] = text.strip()
        elif current:
            for n in current:
                docs[n] += " " + line.strip()
    return docs


def describe_recipe(recipe: Recipe) -> str:
    """Every field of every section of ``recipe``: its type, its value here, whether that is its default,
    and its doc (what ``diffalign train RECIPE --help`` prints)."""
    sections = [("model", recipe.model), ("data", recipe.data), ("train", recipe.train),
                (f"method: {recipe.method.name}", recipe.method.config)]
    hints_of = typing.get_type_hints
    out = []
    for title, config in sections:
        cls = type(config)
        out.append(f"{title} ({cls.__name__})")
        docs, hints = field_docs(cls), hints_of(cls)
        for f in dataclasses.fields(cls):
            value = getattr(config, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            mark = "" if value == default else "   (default " + repr(default) + ")"
            out.append(f"  --{title.split(':')[0]}.{f.name}: {_type_name(hints[f.name])} = {value!r}{mark}")
            if docs.get(f.name):
                out.append(f"      {docs[f.name]}")
        out.append("")
    return "\n".join(out)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is None and isinstance(hint, type):
        return hint.__name__
    return str(hint).replace("typing.", "")


def coerce(value: Any, hint: Any, where: str) -> Any:
    """``value`` checked against the type ``hint`` (``int``, ``float``, ``bool``, ``str``, unions,
    ``list[...]``, ``dict[...]``, ``Literal``), converted where that is lossless: an int for a float, a
    numeric string for a number (YAML reads ``1e-5`` as a string). A :class:`ConfigError` otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{where} must be {' or '.join(_type_name(a) for a in args)}, not {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, not {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}")
        return value
    if hint in (int, float):
        number = value
        if isinstance(value, str):
            try:
                number = float(value) if hint is float or not value.strip().lstrip("+-").isdigit() else int(value)
            except ValueError:
                raise ConfigError(f"{where} must be a number, not {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{where} must be {'a number' if hint is float else 'an integer'}, not {value!r}")
        if hint is float:
            return float(number)
        if isinstance(number, float) and not (math.isfinite(number) and number.is_integer()):
            raise ConfigError(f"{where} must be an integer, not {value!r}")
        return int(number)
    if hint is str:
        if not isinstance(value, str):
            hint_bool = " (YAML reads yes/no/on/off as booleans: quote it)" if isinstance(value, bool) else ""
            raise ConfigError(f"{where} must be a string, not {value!r}{hint_bool}")
        return value
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, not {value!r}")
        item = args[0] if args else Any
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where} must be a mapping, not {value!r}")
        kt, vt = args if len(args) == 2 else (Any, Any)
        return {coerce(k, kt, f"{where} key"): coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where} must be {_type_name(hint)}, not {value!r}")
    return value


def _label(where: str, name: str, method: bool) -> str:
    return f"{where} option {name}" if method else f"{where}.{name}"


def build_dataclass(cls, values: Mapping[str, Any], where: str, *, method: bool = False):
    """``cls(**values)`` with every value checked (:func:`coerce`); an unknown key is a
    :class:`ConfigError` listing the known ones. ``where`` names the section (``"train"``) or, with
    ``method=True``, the method whose options these are (``"method 'mapo'"``)."""
    word = "option" if method else "key"
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a mapping of {word}s, not {values!r}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(fields))
    if unknown and method:
        raise ConfigError(f"bad option for {where}: unknown option(s) {unknown}; known options: "
                          f"{', '.join(sorted(fields)) or '(none)'}")
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in section '{where}'; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    checked = {name: coerce(value, hints[name], _label(where, name, method)) for name, value in values.items()}
    try:
        return cls(**checked)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad {word} for {where}: {e}") from None


@dataclass(frozen=True)
class Range:
    """Allowed values of a number: ``low``/``high`` bounds, each open or closed."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = x > self.low if self.low_open else x >= self.low
        below = x < self.high if self.high_open else x <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return "> 0" if self.low == 0 and self.low_open else f">= {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
PROBABILITY = Range(0, 1)
UNIT_OPEN_LOW = Range(0, 1, low_open=True)
BETA_HIGH_OPEN = Range(0, 1, high_open=True)

# Allowed ranges, by field name, in every method config that has the field (None is always allowed
# where the type allows it) and per recipe section. β is a KL / temperature weight: positive.
RANGES: dict[str, dict[str, Range]] = {
    "method": {
        "beta": POSITIVE, "kl_beta": NON_NEGATIVE, "label_smoothing": PROBABILITY,
        "timestep_fraction": UNIT_OPEN_LOW, "truncation_mean": PROBABILITY, "truncation_std": NON_NEGATIVE,
        "num_steps": POSITIVE, "num_inversion_steps": POSITIVE, "renoise_steps": NON_NEGATIVE,
        "steps_per_update": POSITIVE, "num_inner_epochs": POSITIVE, "prompts_per_epoch": POSITIVE,
        "images_per_prompt": POSITIVE, "sample_batch_size": POSITIVE, "resolution": POSITIVE,
        "buffer_size": POSITIVE, "min_count": POSITIVE, "steps_per_epoch": POSITIVE, "snapshot_every": POSITIVE,
        "max_pool": POSITIVE, "max_length": POSITIVE, "k": POSITIVE, "n": NON_NEGATIVE,
        "eta": NON_NEGATIVE, "guidance_scale": NON_NEGATIVE, "clip_range": POSITIVE, "eps": NON_NEGATIVE,
        "adv_eps": NON_NEGATIVE, "adv_clip_max": POSITIVE, "win_rate_temperature": POSITIVE,
        "desirable_weight": NON_NEGATIVE, "undesirable_weight": NON_NEGATIVE, "pretrain_weight": NON_NEGATIVE,
        "sft_weight": NON_NEGATIVE, "tie_margin": NON_NEGATIVE, "loss_scale": POSITIVE, "scale": POSITIVE,
        "num_user_tokens": POSITIVE, "adapter_scale": NON_NEGATIVE,
    },
    "model": {"lora_rank": NON_NEGATIVE, "lora_alpha": POSITIVE, "embedded_guidance": NON_NEGATIVE},
    "data": {"resolution": POSITIVE, "caption_dropout": PROBABILITY, "max_samples": POSITIVE,
             "max_bad_fraction": PROBABILITY, "num_workers": NON_NEGATIVE, "prefetch_factor": POSITIVE},
    "train": {
        "max_steps": POSITIVE, "batch_size": POSITIVE, "gradient_accumulation_steps": POSITIVE,
        "learning_rate": POSITIVE, "lr_warmup_steps": NON_NEGATIVE, "adam_beta1": BETA_HIGH_OPEN,
        "adam_beta2": BETA_HIGH_OPEN, "adam_epsilon": POSITIVE, "weight_decay": NON_NEGATIVE,
        "max_grad_norm": NON_NEGATIVE, "checkpointing_steps": NON_NEGATIVE, "checkpoints_total_limit": POSITIVE,
        "validation_steps": NON_NEGATIVE, "validation_num_inference_steps": POSITIVE,
        "validation_guidance_scale": NON_NEGATIVE, "max_nonfinite_steps": POSITIVE,
    },
}


# Allowed values of string fields, per recipe section (None is always allowed where the type allows it).
CHOICES: dict[str, dict[str, tuple[str, ...]]] = {
    "model": {"family": ("sd", "sdxl", "sd3", "wan", "qwen-image", "z-image", "flux")},
    "train": {"mixed_precision": ("no", "fp16", "bf16", "fp8")},
}


def check_choices(config, where: str, section: str) -> None:
    """A :class:`ConfigError` for the first string field of ``config`` that is not one of its
    :data:`CHOICES` for ``section``."""
    for name, allowed in CHOICES.get(section, {}).items():
        value = getattr(config, name, None)
        if value is not None and value not in allowed:
            raise ConfigError(f"{where}.{name} must be one of {', '.join(allowed)}, not {value!r}")


def check_ranges(config, where: str, section: str = "method") -> None:
    """A :class:`ConfigError` for the first numeric field of ``config`` outside its :data:`RANGES`
    entry for ``section`` (``where`` names it in the message, as in :func:`build_dataclass`)."""
    rules = RANGES[section]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in rules and isinstance(value, (int, float)) and not isinstance(value, bool):
            if value not in rules[f.name]:
                raise ConfigError(f"{_label(where, f.name, section == 'method')} must be {rules[f.name]}, "
                                  f"not {value!r}")


def build_section(cls, values: dict[str, Any], where: str):
    """A recipe section's dataclass ``cls`` from ``values``, checked (types, :data:`RANGES`, :data:`CHOICES`)."""
    config = build_dataclass(cls, values, where)
    check_ranges(config, where, section=where)
    check_choices(config, where, section=where)
    return config


