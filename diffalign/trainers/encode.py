"""`diffalign data encode RECIPE [--section.key=value ...]`: pre-encode a data set into the latent cache.

Every image of the recipe's data, at each placement training can draw for it (the centre crop, and its
mirror with ``data.random_flip``), goes through the VAE once; every caption (and ``""`` with caption
dropout) through the text encoders once. Rows are split across processes (``accelerate launch``), a
rerun skips what the cache holds (so an interrupted run resumes), and bad rows are counted by reason.
When it is done it writes a manifest (``encoded-<id>.json``) in the cache: a training run of the same
data and model then loads no text encoder and drops the VAE encoder (its log says so), since every batch
it can draw is in the cache.

The cache's size: a latent is ``C × (R/8)²`` float32 values: for SDXL at 1024², 4 × 128 × 128 × 4 B =
256 KiB an image, 512 KiB a pair (twice that with ``random_flip``); the text embeddings of a caption
are 77 × 2048 × 4 B = 616 KiB plus the 1280-d pooled vector (SD 1.x at 512²: 64 KiB an image, 231 KiB a
caption).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

ACCEPTS_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="the training recipe (YAML or a bundled recipe's name) whose data to encode")
    parser.add_argument("--batch-size", type=int, default=16, help="images per VAE call (default 16)")
    parser.add_argument("--allow-pickle", action="store_true", help="also load pickled (.bin) model weights")


def run(args: argparse.Namespace) -> int:
    from diffalign.trainers.registry import load_recipe

    overrides = list(getattr(args, "overrides", []))
    if args.allow_pickle:
        overrides.append("model.allow_pickle=true")
    recipe = load_recipe(None if args.recipe == "-" else args.recipe, overrides)
    result = encode_data(recipe, batch_size=args.batch_size)
    print(f"encoded {result.rows} rows into {result.manifest.parent}: {result.images} images and {result.prompts} "
          f"prompts encoded now, {result.cached} already cached; {result.stats}")
    return 0


@dataclass
class EncodeResult:
    """What :func:`encode_data` did: rows read (this process's), images and prompts it encoded, entries it
    found already cached, the manifest it wrote, and the counts of rows kept and skipped."""

    rows: int
    images: int
    prompts: int
    cached: int
    manifest: Path
    stats: object = field(default=None)


def encode_data(recipe, *, batch_size: int = 16, accelerator=None) -> EncodeResult:
    """Encode the recipe's data into its latent cache (see the module docstring); returns the counts."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from diffalign.data.cache import LatentCache
    from diffalign.data.dataset import placed_image_key
    from diffalign.data.files import atomic_write
    from diffalign.data.examples import open_examples
    from diffalign.data.pairs import BadRow, DataStats, SkipRow, skip_reason
    from diffalign.data.transforms import place_image, render
    from diffalign.errors import UsageError
    from diffalign.models.loading import load_backbone, resolve_pretrained
    from diffalign.trainers.data import TrainingData, cache_namespace, cache_root, manifest_path

    d = recipe.data
    if not d.center_crop:
        raise UsageError("data encode stores each image at the placements training can draw, but random crops "
                         "(data.center_crop: false) are drawn per step: use data.center_crop: true, or let training "
                         "fill the cache as it goes")
    root = cache_root(recipe)
    if root is None:
        raise UsageError("data.cache_dir is '' (the cache is off): there is nothing to encode into")
    if batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {batch_size}")
    acc = accelerator or Accelerator()
    backbone = load_backbone(resolve_pretrained(recipe.model.pretrained), family=recipe.model.family,
                             revision=recipe.model.revision, variant=recipe.model.variant,
                             allow_pickle=recipe.model.allow_pickle).to(acc.device)
    kind = {"feedback": "feedback", "ranked": "ranked"}.get(d.format, "pairs")
    examples, kind = open_examples(d, kind)
    cache = LatentCache(root, cache_namespace(recipe, str(backbone.vae.dtype)))
    encoder = TrainingData(items=None, kind=kind, backbone=backbone, resolution=d.resolution, batch_size=1,
                           gradient_accumulation_steps=1, seed=0, cache=cache)
    flips = (False, True) if d.random_flip else (False,)
    stats, pending_images, pending_prompts = DataStats(), {}, {}
    if acc.is_main_process:  # ties left out when the data was opened (from its label column)
        stats.rows = stats.ties_dropped = examples.ties_dropped
    counts = {"images": 0, "prompts": 0, "cached": 0}

    def flush() -> None:
        if pending_images:
            keys = list(pending_images)
            pixels, good = [], []
            for k in keys:
                image, placement, where = pending_images[k]
                try:
                    pixels.append(render(image, placement, d.resolution))
                    good.append(k)
                except ValueError as e:
                    stats.skip_bad(where, str(e), skip_reason(e))
            if good:
                encoder.encode_latents(torch.stack(pixels), good)
                counts["images"] += len(good)
            pending_images.clear()
        if pending_prompts:
            encoder.encode_text(list(pending_prompts))
            counts["prompts"] += len(pending_prompts)
            pending_prompts.clear()

    def want_prompt(p: str) -> None:
        if cache.has_text(p):
            counts["cached"] += 1
        elif p not in pending_prompts:
            pending_prompts[p] = None

    if d.caption_dropout > 0 and acc.is_main_process:
        want_prompt("")
    rows = range(acc.process_index, examples.num_rows(), acc.num_processes)
    for r in tqdm(rows, desc="encode", disable=not acc.is_main_process):
        stats.rows += 1
        try:
            item = examples.get(r)
        except SkipRow as skip:
            stats.skip_or_raise(skip, skip.where, strict=d.strict)
            continue
        except BadRow as bad:
            if d.strict:
                raise
            stats.skip_bad(str(bad).partition(": ")[0], str(bad), bad.reason)
            continue
        stats.kept += 1
        if kind == "ranked":
            images, prompts = item.images, [item.caption]
        elif kind == "feedback":
            images, prompts = [item.image], [item.prompt]
        else:
            images, prompts = [item.chosen, item.rejected], [item.prompt, item.prompt_rejected or item.prompt]
        for image in images:
            for flip in flips:
                placement = place_image(image.width, image.height, d.resolution, center_crop=True, flip=flip)
                key = placed_image_key(image, placement)
                if cache.has_latent(key):
                    counts["cached"] += 1
                elif key not in pending_images:
                    pending_images[key] = (image, placement, getattr(item, "source", ""))
        for p in dict.fromkeys(prompts):
            want_prompt(p)
        if len(pending_images) >= batch_size or len(pending_prompts) >= batch_size:
            flush()
    flush()

    acc.wait_for_everyone()
    parts = gather_object([stats.as_dict()]) if acc.num_processes > 1 else [stats.as_dict()]
    path = manifest_path(recipe, str(backbone.vae.dtype))
    if acc.is_main_process:
        total = {k: sum(p[k] for p in parts) for k in ("rows", "kept", "ties_dropped", "bad_images")}
        skipped: dict[str, int] = {}
        for p in parts:
            for k, n in p["skipped"].items():
                skipped[k] = skipped.get(k, 0) + n
        manifest = {"complete": True, "source": d.source if isinstance(d.source, str) else list(map(str, d.source)),
                    "format": d.format, "resolution": d.resolution, "random_flip": d.random_flip,
                    "caption_dropout": d.caption_dropout > 0, **total, "skipped": skipped}
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
    acc.wait_for_everyone()
    return EncodeResult(stats.rows, counts["images"], counts["prompts"], counts["cached"], path, stats)
