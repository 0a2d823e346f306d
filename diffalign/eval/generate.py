"""Image generation with fixed per-prompt seeds, for evaluation and preference-data sampling.

:func:`generate` returns images for ``(prompt, seed)`` lists (the demo and data sampling use it);
:func:`generate_folder` writes a benchmark run in GenEval's folder layout, resumably, with a
``generation.json`` record; :func:`load_eval_pipeline` loads a model (with a LoRA or a fine-tuned
denoiser) to sample from.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from tqdm.auto import tqdm

from diffalign.data.generated import METADATA_FILE

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    batch_size: int = 16,
    progress: str | None = None,
    **pipe_kwargs,
) -> list[Image.Image]:
    """One image per ``(prompt, seed)``; image ``i`` depends only on ``prompts[i]`` and ``seeds[i]``.

    Each image gets its own ``torch.Generator`` seeded with ``seeds[i]``, so the same prompt and seed
    give the same initial noise for a base model and its aligned version (paired comparisons).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    images: list[Image.Image] = []
    bar = tqdm(total=len(prompts), desc=progress, disable=progress is None)
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[chunk]]
        out = pipe(list(prompts[chunk]), generator=gens, num_inference_steps=num_inference_steps,
                   **guidance_kwargs(pipe, guidance_scale, len(gens), pipe_kwargs))
        images.extend(out.images)
        bar.update(len(gens))
    bar.close()
    return images


# ---------------------------------------------------------------------------- benchmark folders
#
# A generated benchmark run is a folder in GenEval's layout, which GenEval's own scorer (and any
# script written for it) reads:
#
#     OUT/generation.json                  how the images were made (settings, seed rule, versions)
#     OUT/00000/metadata.jsonl             the prompt's metadata line (for GenEval: its own line)
#     OUT/00000/samples/0000.png           image 0 of prompt 0, ...
#
# The folder number is the prompt's index in the *full* prompt set, so a run limited to a few
# prompts and the full run agree on folder names and seeds.

SEED_STRIDE = 10_000
SEED_RULE = (f"seed = base_seed + {SEED_STRIDE} * prompt_index + sample_index, prompt_index = the prompt's position "
             "in the full prompt set; one CPU torch.Generator per image")
GENERATION_FILE = "generation.json"
# settings that change the pixels: a folder holding images made with other values is not resumed
RESUME_KEYS = ("model", "lora", "finetuned", "family", "scheduler", "dtype", "variant", "revision",
               "num_inference_steps", "guidance_scale", "height", "width", "negative_prompt", "base_seed",
               "images_per_prompt", "batch_size", "seed_rule")


def image_seed(base_seed: int, prompt_index: int, sample_index: int) -> int:
    """The seed of image ``sample_index`` of prompt ``prompt_index`` (:data:`SEED_RULE`).

    It depends on neither the number of images per prompt nor the prompts selected, so a larger
    or a limited run makes the same image for the same prompt and sample."""
    if not 0 <= sample_index < SEED_STRIDE:
        raise ValueError(f"sample_index must be in [0, {SEED_STRIDE}), got {sample_index}")
    return int(base_seed) + SEED_STRIDE * int(prompt_index) + int(sample_index)


def prompt_dir(out_dir: str | Path, prompt_index: int) -> Path:
    """``OUT/00012`` for prompt 12."""
    return Path(out_dir) / f"{prompt_index:05d}"


def sample_path(out_dir: str | Path, prompt_index: int, sample_index: int) -> Path:
    """``OUT/00012/samples/0003.png`` for sample 3 of prompt 12."""
    return prompt_dir(out_dir, prompt_index) / "samples" / f"{sample_index:04d}.png"


def metadata_line(item) -> dict:
    """The ``metadata.jsonl`` line of a :class:`~diffalign.eval.prompts.PromptItem`.

    GenEval-format metadata (with ``include``) is written as it is, so GenEval's scorer reads it;
    other sets get ``{"prompt", "category", **metadata}``."""
    meta = dict(item.metadata)
    if "include" in meta:
        meta.setdefault("prompt", item.text)
        return meta
    return {"prompt": item.text, "category": item.category, **{k: v for k, v in meta.items()
                                                               if k not in ("prompt", "category")}}


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide the pixels (and of Python)."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "peft", "diffalign"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (a temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_png(image: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def write_json(path: str | Path, data) -> None:
    """``data`` as indented JSON, written whole (temp file, then rename)."""
    atomic_write_bytes(Path(path), (json.dumps(data, indent=2) + "\n").encode())


def default_resolution(pipe) -> tuple[int, int]:
    """The pipeline's default ``(height, width)``: its ``default_sample_size`` × ``vae_scale_factor``."""
    size = getattr(pipe, "default_sample_size", None)
    if size is None:
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer")
        size = denoiser.config.sample_size
    side = int(size) * int(getattr(pipe, "vae_scale_factor", 8))
    return side, side


def pipeline_settings(pipe) -> dict:
    """What the pipeline itself contributes to a run's record: its class, scheduler and dtype."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    return {"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
            "scheduler_config": {k: v for k, v in dict(pipe.scheduler.config).items() if not k.startswith("_")},
            "dtype": str(getattr(denoiser, "dtype", "")).removeprefix("torch.")}


@dataclass
class GenerationResult:
    """What :func:`generate_folder` did: images ``generated`` now, ``skipped`` (already there), ``total``."""

    out_dir: Path
    generated: int
    skipped: int
    total: int
    record: dict


def _check_resumable(out_dir: Path, record: dict) -> None:
    path = out_dir / GENERATION_FILE
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())["settings"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a generation record ({type(e).__name__}: {e}); use another output folder") \
            from e
    new = record["settings"]
    differ = [k for k in RESUME_KEYS if old.get(k) != new.get(k)]
    if differ:
        detail = "; ".join(f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in differ)
        raise ValueError(f"{out_dir} holds images generated with other settings ({detail}); its images would not be "
                         "reproducible with these, so choose another output folder (or delete it)")


def _write_metadata(out_dir: Path, prompt_index: int, item) -> None:
    line = json.dumps(metadata_line(item)) + "\n"
    path = prompt_dir(out_dir, prompt_index) / METADATA_FILE
    if path.is_file():
        if path.read_text() != line:
            raise ValueError(f"{path}: holds a different prompt than prompt {prompt_index} of this prompt set "
                             f"({item.text!r}); the folder belongs to another prompt set or order")
        return
    atomic_write_bytes(path, line.encode())


def generate_folder(pipe, items: Sequence, out_dir: str | Path, *, indices: Sequence[int] | None = None,
                    images_per_prompt: int = 4, seed: int = 0, num_inference_steps: int = 50,
                    guidance_scale: float = 7.5, height: int | None = None, width: int | None = None,
                    batch_size: int = 8, negative_prompt: str | None = None, info: dict | None = None,
                    progress: str | None = "generate") -> GenerationResult:
    """Generate ``images_per_prompt`` images for each prompt into ``out_dir`` in GenEval's layout.

    ``items``: the prompt set's :class:`~diffalign.eval.prompts.PromptItem` list; ``indices``: the
    positions (in ``items``) to generate, default all. Image ``j`` of prompt ``i`` is seeded by
    :func:`image_seed` (``seed + 10000·i + j``) with its own CPU generator.

    Resumable: an image whose file exists is not generated again, and a folder made with other
    settings (``info`` ∪ the arguments, see :data:`RESUME_KEYS`) is refused. Images are made in
    batches of ``batch_size`` over the (prompt, sample) list in order; a batch with a missing image
    is run whole and only the missing files are written, so each image comes from the same batch
    as in an unbroken run and is bit-identical to it (on the same hardware). Files are written
    atomically, so an interrupted run leaves no truncated image. ``info``: extra fields for
    ``generation.json`` (``model``, ``lora``, ...: whatever identifies the pipeline).
    """
    out_dir = Path(out_dir)
    if images_per_prompt < 1 or batch_size < 1:
        raise ValueError(f"images_per_prompt and batch_size must be positive, got {images_per_prompt}, {batch_size}")
    indices = list(range(len(items))) if indices is None else [int(i) for i in indices]
    bad = [i for i in indices if not 0 <= i < len(items)]
    if bad:
        raise IndexError(f"prompt indices {bad[:5]} out of range for a prompt set of {len(items)}")
    if height is None or width is None:
        h, w = default_resolution(pipe)
        height, width = height or h, width or w
    # the pipeline's own class, scheduler and dtype win over what ``info`` says was asked for
    settings = {**(info or {}), **pipeline_settings(pipe),
                "num_inference_steps": int(num_inference_steps), "guidance_scale": float(guidance_scale),
                "height": int(height), "width": int(width), "negative_prompt": negative_prompt,
                "images_per_prompt": int(images_per_prompt), "batch_size": int(batch_size), "base_seed": int(seed),
                "seed_rule": SEED_RULE}
    record = {"settings": settings, "versions": library_versions(), "layout": "geneval",
              "n_prompts_in_set": len(items), "prompt_indices": indices}
    _check_resumable(out_dir, record)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / GENERATION_FILE, {**record, "complete": False})
    for i in indices:
        _write_metadata(out_dir, i, items[i])

    jobs = [(i, j) for i in indices for j in range(images_per_prompt)]
    have = {job for job in jobs if sample_path(out_dir, *job).is_file()}
    generated = 0
    bar = tqdm(total=len(jobs), initial=len(have), desc=progress, unit="img", disable=progress is None)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        if all(job in have for job in chunk):
            continue
        gens = [torch.Generator("cpu").manual_seed(image_seed(seed, i, j)) for i, j in chunk]
        kw = guidance_kwargs(pipe, guidance_scale, len(chunk), _negative_kwargs(negative_prompt, len(chunk)))
        out = pipe([items[i].text for i, _ in chunk], generator=gens, num_inference_steps=num_inference_steps,
                   height=height, width=width, output_type="pil", **kw)
        for job, image in zip(chunk, out.images):
            if job not in have:
                _save_png(image, sample_path(out_dir, *job))
                generated += 1
                bar.update(1)
    bar.close()
    record = {**record, "complete": True, "n_images": len(jobs)}
    write_json(out_dir / GENERATION_FILE, record)
    return GenerationResult(out_dir, generated, len(have), len(jobs), record)


def guidance_kwargs(pipe, guidance_scale: float, n: int, kwargs: dict) -> dict:
    """``kwargs`` plus the pipeline's CFG arguments for ``guidance_scale``: ``guidance_scale`` itself, except for
    Qwen-Image and FLUX.1 without a guidance embedding (schnell), whose ``guidance_scale`` is for guidance-distilled
    models only and whose CFG is ``true_cfg_scale`` with a negative prompt (``""`` for each of the ``n`` prompts
    unless one is given, as diffalign trains it). A guidance-distilled FLUX.1 (dev) takes ``guidance_scale`` as
    its embedding's input, as diffalign samples it."""
    name = type(pipe).__name__
    distilled = name.startswith("Flux") and pipe.transformer.config.get("guidance_embeds", False)
    if not (name.startswith("QwenImage") or (name.startswith("Flux") and not distilled)):
        return {**kwargs, "guidance_scale": guidance_scale}
    kwargs = {**kwargs, "true_cfg_scale": guidance_scale}
    if guidance_scale > 1:
        kwargs.setdefault("negative_prompt", [""] * n)
    return kwargs


def _negative_kwargs(negative_prompt: str | None, n: int) -> dict:
    return {} if negative_prompt is None else {"negative_prompt": [negative_prompt] * n}


# ---------------------------------------------------------------------------- loading a model to evaluate

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | None) -> str:
    """``"auto"`` (or None) → ``cuda`` when available, else ``cpu``; anything else as given."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def load_eval_pipeline(pretrained: str, *, lora: str | None = None, finetuned: str | None = None,
                       family: str | None = None, scheduler: str | None = None, dtype: str | None = None,
                       variant: str | None = None, revision: str | None = None,
                       device: str | None = "auto", allow_pickle: bool = False) -> DiffusionPipeline:
    """A diffusers pipeline to sample from: ``pretrained`` (hub id, folder, or ``bundled:NAME``),
    optionally with a LoRA (``pipe.load_lora_weights``: a folder such as a run's ``final/``, a
    ``.safetensors`` file or a hub id) or a fine-tuned denoiser (a folder holding ``unet/`` or
    ``transformer/``, as a full fine-tune's ``final/``), and another scheduler class by name
    (``DPMSolverMultistepScheduler``, built from the pipeline's scheduler config). Weights load from
    safetensors only unless ``allow_pickle``."""
    from diffalign.models.loading import load_backbone, resolve_pretrained

    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    backbone = load_backbone(resolve_pretrained(pretrained), family=family,
                             torch_dtype=DTYPES[dtype] if dtype else None, variant=variant, revision=revision,
                             allow_pickle=allow_pickle)
    pipe = backbone.pipeline
    if finetuned:
        path = Path(finetuned)
        if not (path / backbone.denoiser_name / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no {backbone.denoiser_name}/config.json (a fine-tuned denoiser folder, "
                                    "as `diffalign train` with lora_rank 0 writes in final/)")
        backbone.load_trained(path)
    if lora:
        lora_path = Path(lora)
        pickled = lora_path.suffix in (".bin", ".pt", ".pth") or (
            lora_path.is_dir() and not list(lora_path.glob("*.safetensors"))
            and any(lora_path.glob("*.bin")))
        if pickled and not allow_pickle:
            from diffalign.models.backbone import PickledWeightsError

            raise PickledWeightsError(
                f"{lora}: the LoRA weights are pickled (.bin), and unpickling a file can run code: convert them "
                "(save_lora_weights with safe_serialization=True), or pass --allow-pickle if you trust the files")
        try:
            pipe.load_lora_weights(lora, use_safetensors=None if allow_pickle else True)
        except (OSError, ValueError) as e:
            raise OSError(f"cannot load the LoRA {lora!r} into {type(pipe).__name__}: {e}") from e
    if scheduler:
        import diffusers

        cls = getattr(diffusers, scheduler, None)
        if cls is None or not hasattr(cls, "from_config"):
            raise ValueError(f"unknown diffusers scheduler class {scheduler!r}")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(device))
