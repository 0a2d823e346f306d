"""From a recipe's data section to encoded, noised training batches.

``TrainingData.batch(step, micro, process, num_processes)`` is a pure function of the run position:
which examples, their crops/flips, caption dropout, noise and timestep all come from a generator
seeded by ``(seed, example position)``. VAE latents and text embeddings go through the on-disk
:class:`~diffalign.data.cache.LatentCache`, so after the first pass no VAE or text encoder runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffalign.core.positions import (
    EpochOrder,
    micro_batch_positions,
    position_generator,
    stable_seed,
)
from diffalign.models.base import Conditioning
from diffalign.trainers.method import TrainBatch


@dataclass
class TrainingData:
    """Materialised examples plus everything needed to turn a run position into a ``TrainBatch``.

    ``kind``: ``pairs`` (winner, loser), ``chosen`` (winners only, SFT), ``feedback`` (KTO: single
    images), ``feedback-pairs`` (KTO from preference pairs, laid out as ``pairs``: the winners desirable,
    the losers undesirable, each pair's two images on the same noise and timestep) or ``ranked`` (RankDPO:
    lists of images best first; every list is cut to the shortest list's length ``K`` by a random subset,
    kept in rank order).
    """

    items: list
    kind: str
    backbone: object
    resolution: int
    batch_size: int
    gradient_accumulation_steps: int
    seed: int
    center_crop: bool = True
    random_flip: bool = False
    caption_dropout: float = 0.0
    cache: object | None = None
    stats: object | None = None
    list_size: int = 2
    _order: EpochOrder | None = field(default=None, repr=False)

    # ---- which examples (diffalign.core.positions)
    def positions(self, step: int, micro: int, process: int, num_processes: int) -> list[int]:
        """Run positions of the examples in one micro-batch of one process."""
        return micro_batch_positions(step, micro, process, num_processes, self.batch_size,
                                     self.gradient_accumulation_steps)

    def item_at(self, position: int):
        """The item at a run position (each epoch a seeded shuffle of the items)."""
        if self._order is None:
            self._order = EpochOrder(len(self.items), self.seed, "epoch")
        return self.items[self._order(position)]

    def example_generators(self, positions: list[int]) -> list[torch.Generator]:
        """One generator per example, seeded by ``(seed, position)``: its placement, caption dropout,
        noise and timestep are drawn from it, in that order."""
        return [position_generator(self.seed, "example", p) for p in positions]

    # ---- one micro-batch
    def batch(self, step: int, micro: int, process: int, num_processes: int) -> TrainBatch:
        from diffalign.data.dataset import latent_key
        from diffalign.data.transforms import place_image, place_pair, render

        positions = self.positions(step, micro, process, num_processes)
        gens = self.example_generators(positions)
        items = [self.item_at(p) for p in positions]
        # each example's images with their placements (crop, flip): pixels are made only for cache misses
        placed, prompts, keys, weights, desirable, scores = [], [], [], [], [], []
        res = self.resolution
        for item, g in zip(items, gens):
            drop = self.caption_dropout > 0 and torch.rand((), generator=g).item() < self.caption_dropout
            if self.kind == "ranked":
                k = self.list_size
                pick = sorted(torch.randperm(len(item.ranking), generator=g)[:k].tolist())  # rank positions
                order = [item.ranking[r] for r in pick]  # image indices, best first
                flip = self.random_flip and bool(torch.rand((), generator=g) < 0.5)
                images = [item.images[i] for i in order]
                spots = [place_image(im.width, im.height, res, center_crop=self.center_crop, flip=flip, generator=g)
                         for im in images]
                placed.append(list(zip(images, spots)))
                keys.append([latent_key(item.key, f"image{i}", pl) for i, pl in zip(order, spots)])
                prompts.append(["" if drop else item.caption] * k)
                scores.append([float(item.scores[i]) for i in order])
                weights.append(1.0)
                continue
            if self.kind == "feedback":
                spot = place_image(item.image.width, item.image.height, res, center_crop=self.center_crop,
                                   random_flip=self.random_flip, generator=g)
                placed.append([(item.image, spot)])
                keys.append([latent_key(item.key, "image", spot)])
                prompts.append(["" if drop else item.prompt])
                desirable.append(bool(item.desirable))
                weights.append(1.0)
                continue
            w, l = place_pair(item, res, center_crop=self.center_crop, random_flip=self.random_flip, generator=g)
            if self.kind == "chosen":
                placed.append([(item.chosen, w)])
                keys.append([latent_key(item.key, "chosen", w)])
                prompts.append(["" if drop else item.prompt])
            else:
                placed.append([(item.chosen, w), (item.rejected, l)])
                keys.append([latent_key(item.key, "chosen", w), latent_key(item.key, "rejected", l)])
                p_l = item.prompt_rejected if item.prompt_rejected is not None else item.prompt
                prompts.append(["" if drop else item.prompt, "" if drop else p_l])
                sc = getattr(item, "scores", None)
                scores.append(list(sc) if sc is not None else [float("nan")] * 2)
            weights.append(float(getattr(item, "weight", 1.0)))
        group = len(placed[0])
        if self.kind == "feedback-pairs":  # per-row feedback and weights: [winners, losers]
            desirable = [True] * len(items) + [False] * len(items)
            weights = weights * 2
        # group-major layout: [all winners, all losers]
        rows = [placed[i][j] for j in range(group) for i in range(len(items))]
        row_keys = [keys[i][j] for j in range(group) for i in range(len(items))]
        row_prompts = [prompts[i][j] for j in range(group) for i in range(len(items))]
        row_scores = [scores[i][j] for j in range(group) for i in range(len(items))] if scores else None

        device = self.backbone.device
        latents = self.encode_latents(lambda idx: torch.stack([render(*rows[i], res) for i in idx]), row_keys)
        latents = latents.to(device)
        cond = self.encode_text(row_prompts).to(device)
        if getattr(self.backbone, "family", None) == "sdxl":
            cond.time_ids = self.backbone.time_ids(
                torch.tensor([pl.original_size for _, pl in rows]), torch.tensor([pl.crop_top_left for _, pl in rows]),
                (res, res)).to(device)

        noisy = self.backbone.forward_process.noise_examples(latents, gens, group_size=group)
        return TrainBatch(
            latents=latents, noise=noisy.noise, x_t=noisy.x_t, target=noisy.target,
            timesteps=noisy.timesteps, cond=cond, weights=torch.tensor(weights, device=device),
            desirable=torch.tensor(desirable, device=device) if self.kind.startswith("feedback") else None,
            prompts=row_prompts,
            scores=None if row_scores is None else torch.tensor(row_scores, device=device, dtype=torch.float32),
        )

    # ---- encoding through the cache
    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor | Callable[[list[int]], torch.Tensor], keys: list[str]
                       ) -> torch.Tensor:
        """VAE latents ``[N, C, h, w]`` (the posterior mean) of the ``N`` images named by ``keys``.

        ``pixels``: ``[N, 3, H, W]`` in [-1, 1], or a function giving the pixels of the rows at the given
        indices; it is called for the cache misses only, so a cached step decodes no image."""
        encode = lambda px: self.backbone.encode_images(px.to(self.backbone.device), sample=False).float().cpu()  # noqa: E731
        pixels_of = pixels if callable(pixels) else (lambda idx: pixels[idx])
        if self.cache is None:
            return encode(pixels_of(list(range(len(keys)))))
        found = self.cache.get_latents(keys)
        missing = [i for i, k in enumerate(keys) if k not in found]
        if missing:
            fresh = encode(pixels_of(missing))
            self.cache.put_latents({keys[i]: fresh[j] for j, i in enumerate(missing)})
            found.update({keys[i]: fresh[j] for j, i in enumerate(missing)})
        return torch.stack([found[k] for k in keys])

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        encode = lambda ps: self.backbone.encode_prompt(ps).to("cpu")  # noqa: E731
        if self.cache is None:
            return encode(prompts)
        unique = list(dict.fromkeys(prompts))
        found = self.cache.get_text(unique)
        missing = [p for p in unique if p not in found]
        if missing:
            fresh = encode(missing)
            new = {p: {k: v[j] for k, v in fresh.to_dict().items()} for j, p in enumerate(missing)}
            self.cache.put_text(new)
            found.update(new)
        return Conditioning.cat([Conditioning.from_dict({k: v[None] for k, v in found[p].items()}) for p in prompts])


def load_training_data(recipe, kind: str, backbone, output_dir: Path, accelerator=None) -> TrainingData:
    """Read the recipe's data source into memory and set up the latent cache.

    Images are kept as their checked file bytes (:class:`~diffalign.data.pairs.EncodedImage`) and decoded
    only when a step misses the cache, so memory grows with the compressed size of the set."""
    from diffalign.data.cache import LatentCache
    from diffalign.data.pairs import DataStats

    d = recipe.data
    if not d.source:
        raise ValueError("the recipe has no data.source (a parquet/JSONL path or a hub dataset id)")
    stats = DataStats()
    if d.format == "pickapic":
        from diffalign.data.pickapic import read_pickapic

        items = read_pickapic(d.source, split=d.split, drop_ties=d.drop_ties, strict=d.strict, stats=stats,
                              decode=False)
    elif d.format == "jsonl":
        from diffalign.data.jsonl import read_jsonl_pairs

        items = read_jsonl_pairs(d.source, strict=d.strict, stats=stats, decode=False)
    elif d.format == "feedback":
        from diffalign.data.kto import read_feedback

        items = read_feedback(d.source, strict=d.strict, stats=stats, decode=False)
    elif d.format == "ranked":
        items = _ranked_items(d.source, stats)
    else:
        raise ValueError(f"unknown data.format {d.format!r}; choose pickapic, jsonl, feedback or ranked")
    if (kind == "ranked") != (d.format == "ranked"):
        raise ValueError(f"data.format {d.format!r} does not fit this method: ranked-list methods (RankDPO) take "
                         "data.format: ranked (from 'diffalign data label --format ranked'), the others do not")
    items = _take(items, d.max_samples)  # the readers stream: the counts are complete once this has read
    report_data_stats(stats, d, accelerator)
    if kind == "feedback-pairs" and d.format == "feedback":
        kind = "feedback"  # per-image feedback has no pairs to keep together
    if kind == "feedback" and d.format != "feedback":
        from diffalign.data.kto import feedback_from_pairs

        items = list(feedback_from_pairs(items))
    if not items:
        raise ValueError(f"no usable training examples in {d.source} ({stats})")

    cache = None
    if d.cache_dir != "":
        root = Path(d.cache_dir) if d.cache_dir else output_dir / "cache"
        namespace = stable_seed(recipe.model.pretrained, recipe.model.revision, recipe.model.variant, d.resolution,
                                 d.center_crop, str(backbone.vae.dtype))
        cache = LatentCache(root, namespace=f"{namespace:016x}")
    list_size = min(len(it.ranking) for it in items) if kind == "ranked" else 2
    return TrainingData(
        items=items, kind=kind, backbone=backbone, resolution=d.resolution, batch_size=recipe.train.batch_size,
        gradient_accumulation_steps=recipe.train.gradient_accumulation_steps, seed=recipe.train.seed,
        center_crop=d.center_crop, random_flip=d.random_flip, caption_dropout=d.caption_dropout, cache=cache,
        stats=stats, list_size=list_size,
    )


def report_data_stats(stats, data_config, accelerator=None) -> None:
    """Print what the readers saw (rows read, kept, ties dropped, images skipped and the first skipped rows
    with why) on the main process, and stop with a :class:`~diffalign.errors.UsageError` when the skipped
    share passes ``data.max_bad_fraction``."""
    from diffalign.errors import UsageError

    if accelerator is None or accelerator.is_main_process:
        print(f"data: {stats}")
        for row, why in list(zip(stats.bad_rows, stats.bad_reasons))[:5]:
            print(f"  skipped {row}: {why}" if why else f"  skipped {row}")
        if stats.bad_images > len(stats.bad_rows[:5]):
            print(f"  ... {stats.bad_images - len(stats.bad_rows[:5])} more skipped")
    if stats.rows and stats.bad_images / stats.rows > data_config.max_bad_fraction:
        first = f" (first: {stats.bad_rows[0]}: {stats.bad_reasons[0]})" if stats.bad_rows else ""
        raise UsageError(f"{data_config.source}: {stats.bad_images} of {stats.rows} rows have an undecodable or "
                         f"missing image{first}: more than data.max_bad_fraction={data_config.max_bad_fraction:g}. "
                         "Fix the data or raise the threshold (data.strict=true stops at the first bad row).")


def _ranked_items(source, stats) -> list:
    """Ranked lists (:func:`diffalign.data.label.read_ranked`) with a content key each; lists with
    fewer than two images are skipped."""
    from diffalign.data.label import read_ranked
    from diffalign.data.pairs import content_key

    sources = source if isinstance(source, (list, tuple)) else [source]
    out = []
    for src in sources:
        for n, lst in enumerate(read_ranked(src)):
            stats.rows += 1
            if len(lst.ranking) < 2:
                continue
            if sorted(lst.ranking) != list(range(len(lst.images))) or len(lst.scores) != len(lst.images):
                raise ValueError(f"{src}: list {n}: 'ranking' must be a permutation of the images' indices and "
                                 "'scores' hold one score per image")
            lst.key = content_key(lst.caption, *lst.names, *(im.tobytes() for im in lst.images))
            stats.kept += 1
            out.append(lst)
    return out


def _take(iterator, n: int | None) -> list:
    out = []
    for item in iterator:
        if n is not None and len(out) >= n:
            break
        out.append(item)
    return out
