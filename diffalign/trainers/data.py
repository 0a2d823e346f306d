"""From a recipe's data section to encoded, noised training batches.

``TrainingData.batch(step, micro, process, num_processes)`` is a pure function of the run position:
which examples, their crops/flips, caption dropout, noise and timestep all come from a generator
seeded by ``(seed, example position)``. VAE latents and text embeddings go through the on-disk
:class:`~diffalign.data.cache.LatentCache`, so after the first pass no VAE or text encoder runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffalign.core.positions import (
    BlockOrder,
    EpochOrder,
    micro_batch_positions,
    position_generator,
    stable_seed,
)
from diffalign.models.base import Conditioning
from diffalign.trainers.method import TrainBatch

MAX_SKIP_AHEAD = 10_000  # rows tried for one position before the data is declared unusable
MIN_ROWS_JUDGED = 100  # rows read before data.max_bad_fraction is judged (all of them in a smaller set)


@dataclass
class Example:
    """One example as read by :meth:`TrainingData.read_example`: its images (each ``(image, placement,
    cache key)``), one prompt and score per image, its loss weight and feedback, and its generator (the
    placement draws taken; the noise and timestep come next), and who labelled it (``user``, pairs only)."""

    images: list
    prompts: list[str]
    scores: list[float] | None
    weight: float
    desirable: bool | None
    generator: torch.Generator
    user: str | None = None


@dataclass
class CpuBatch:
    """The CPU half of a micro-batch, made in a DataLoader worker (or in the training process with
    ``data.num_workers: 0``), rows group-major (all winners, then all losers), its tensors packed so that a
    worker hands over a few large tensors rather than many small ones:

    ``latents`` ``[n, C, h, w]``: the cached latents of rows ``latent_rows``; ``pixels`` ``[m, 3, R, R]`` in
    [-1, 1]: the pixels of the rows ``pixel_rows`` that are not cached (either may be ``None``);
    ``keys``, ``prompts``, ``placements`` per row; ``scores`` per row or ``None``; ``weights`` and
    ``desirable`` per loss row; ``generator_states`` ``[B, L]``: each example's generator state;
    ``reads``: ``(row index, None or (reason, where, detail))`` for every row read, skipped ones included
    (the training process counts them); ``users``: each example's user (pairs), or ``None`` when no example
    has one."""

    group: int
    latents: torch.Tensor | None
    latent_rows: list[int]
    pixels: torch.Tensor | None
    pixel_rows: list[int]
    keys: list[str]
    prompts: list[str]
    placements: list
    scores: list[float] | None
    weights: list[float]
    desirable: list[bool] | None
    generator_states: torch.Tensor
    reads: list[tuple]
    users: list[str | None] | None = None

    def known_latents(self) -> dict[str, torch.Tensor]:
        """``{key: latent}`` of the rows that came cached."""
        if self.latents is None:
            return {}
        return {self.keys[r]: self.latents[j] for j, r in enumerate(self.latent_rows)}

    def pixels_of(self, rows: list[int]) -> torch.Tensor:
        """The pixels ``[len(rows), 3, R, R]`` of the given (uncached) rows."""
        where = {r: j for j, r in enumerate(self.pixel_rows)}
        return self.pixels[[where[r] for r in rows]]

    def pin_memory(self) -> CpuBatch:
        """Pinned copies of the tensors (the DataLoader calls this with ``pin_memory=True``)."""
        self.latents = None if self.latents is None else self.latents.pin_memory()
        self.pixels = None if self.pixels is None else self.pixels.pin_memory()
        return self


@dataclass
class TrainingData:
    """A data set plus everything needed to turn a run position into a ``TrainBatch``.

    The examples are read on demand, by index (``examples``: :class:`~diffalign.data.examples.Examples`;
    memory does not grow with the set), or held in memory (``items``: the video pairs of DenseDPO).
    A position's example is the one :class:`~diffalign.core.positions.BlockOrder` puts there; a row that
    is skipped (a tie, an undecodable image, a bad field) is counted once in ``stats`` and the position
    takes the next usable row in the order, so the batch at a run position does not depend on who
    reads it. ``data.num_workers`` DataLoader workers read, decode, place and render the examples
    (:meth:`read`, started by :meth:`start`); the training process encodes what the latent cache
    misses, the prompts, and draws noise and timesteps (:meth:`finish`).

    ``kind``: ``pairs`` (winner, loser), ``chosen`` (winners only, SFT), ``feedback`` (KTO: single
    images), ``feedback-pairs`` (KTO from preference pairs, laid out as ``pairs``: the winners desirable,
    the losers undesirable, each pair's two images on the same noise and timestep) or ``ranked`` (RankDPO:
    lists of images best first; every list is cut to the shortest list's length ``K`` by a random subset,
    kept in rank order).
    """

    items: list | None
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
    examples: object | None = None
    strict: bool = False
    max_bad_fraction: float = 1.0
    source_name: str = ""
    num_workers: int = 0
    prefetch_factor: int = 2
    verbose: bool = True
    encoders_loaded: bool = True
    _order: object | None = field(default=None, repr=False)
    _seen: object | None = field(default=None, repr=False)
    _loader: object | None = field(default=None, repr=False)
    _next: tuple | None = field(default=None, repr=False)
    _finished: int = field(default=0, repr=False)
    _main_pid: int = field(default_factory=os.getpid, repr=False)
    _cache_epoch: int | None = field(default=None, repr=False)

    # ---- which examples (diffalign.core.positions)
    def positions(self, step: int, micro: int, process: int, num_processes: int) -> list[int]:
        """Run positions of the examples in one micro-batch of one process."""
        return micro_batch_positions(step, micro, process, num_processes, self.batch_size,
                                     self.gradient_accumulation_steps)

    def order(self, position: int) -> int:
        """The index of the example (or item) at a run position, before skipping."""
        if self._order is None:
            if self.examples is not None:
                from diffalign.data.sources import ROW_GROUPS_KEPT

                blocks = self.examples.blocks() or [len(self.examples)]
                self._order = BlockOrder(blocks, self.seed, "epoch", window=ROW_GROUPS_KEPT)
            else:
                self._order = EpochOrder(len(self.items), self.seed, "epoch")
        return self._order(position)

    def item_at(self, position: int):
        """The item the order puts at a run position (before any skip: a bad row raises here)."""
        if self.examples is not None:
            return self.examples.get(self.order(position))
        return self.items[self.order(position)]

    def __len__(self) -> int:
        return len(self.examples) if self.examples is not None else len(self.items)

    def example_generators(self, positions: list[int]) -> list[torch.Generator]:
        """One generator per example, seeded by ``(seed, position)``: its placement, caption dropout,
        noise and timestep are drawn from it, in that order."""
        return [position_generator(self.seed, "example", p) for p in positions]

    # ---- the CPU half: runs in DataLoader workers
    def read(self, step: int, micro: int, process: int, num_processes: int) -> CpuBatch:
        """Read, place and render one micro-batch (cached latents where the cache has them)."""
        positions = self.positions(step, micro, process, num_processes)
        if self.cache is not None and os.getpid() != self._main_pid:  # a worker: see the shards written since
            epoch = positions[0] // max(1, len(self))
            if epoch != self._cache_epoch:
                self.cache.refresh()
                self._cache_epoch = epoch
        reads: list[tuple] = []
        examples = [self.read_example(p, reads) for p in positions]
        group = len(examples[0].images)
        n = len(examples)
        rows = [examples[i].images[j] for j in range(group) for i in range(n)]
        scores = [examples[i].scores[j] for j in range(group) for i in range(n)] \
            if examples[0].scores is not None else None
        weights = [e.weight for e in examples]
        desirable = [e.desirable for e in examples] if self.kind == "feedback" else None
        if self.kind == "feedback-pairs":  # per-row feedback and weights: [winners, losers]
            desirable, weights = [True] * n + [False] * n, weights * 2
        users = [e.user for e in examples] if any(e.user is not None for e in examples) else None
        latent_rows = [i for i, r in enumerate(rows) if r[3] is not None]
        pixel_rows = [i for i, r in enumerate(rows) if r[3] is None]
        return CpuBatch(group=group, latents=torch.stack([rows[i][3] for i in latent_rows]) if latent_rows else None,
                        latent_rows=latent_rows, pixel_rows=pixel_rows,
                        pixels=torch.stack([rows[i][4] for i in pixel_rows]) if pixel_rows else None,
                        keys=[r[2] for r in rows], prompts=[examples[i].prompts[j] for j in range(group) for i in range(n)],
                        placements=[r[1] for r in rows], scores=scores, weights=weights, desirable=desirable,
                        generator_states=torch.stack([e.generator.get_state() for e in examples]), reads=reads,
                        users=users)

    def read_example(self, position: int, reads: list[tuple]) -> Example:
        """The example at ``position``: the first usable row from the order's choice on; every row tried
        is appended to ``reads``. ``data.strict``: the first bad row is an error naming file, row and field."""
        from diffalign.data.pairs import BadRow, SkipRow

        for k in range(min(len(self), MAX_SKIP_AHEAD)):
            index = self.order(position + k)
            row = self.examples.row_of(index)
            g = position_generator(self.seed, "example", position)
            try:
                item = self.examples.get(index)
                example = self._place(item, g)
                example.images = [self._pixels_or_latent(*im, where=getattr(item, "source", ""))
                                  for im in example.images]
            except SkipRow as skip:
                outcome = (skip.reason, skip.where, skip.detail)
                if self.strict and skip.reason != "tie":
                    raise ValueError(str(skip)) from None
            except BadRow as bad:
                if self.strict:
                    raise
                outcome = (bad.reason, str(bad).partition(": ")[0], str(bad))
            else:
                reads.append((row, None))
                return example
            reads.append((row, outcome))
        raise ValueError(f"{self.source_name}: no usable row among the {k + 1} read from run position {position} on "
                         f"(the last: {outcome[1]}: {outcome[2]})")

    def _place(self, item, g: torch.Generator) -> Example:
        """Caption dropout, then the placements (crop, flip) of the item's images, drawn from ``g``."""
        from diffalign.data.dataset import placed_image_key as key_of
        from diffalign.data.transforms import place_image, place_pair

        res = self.resolution
        drop = self.caption_dropout > 0 and torch.rand((), generator=g).item() < self.caption_dropout
        if self.kind == "ranked":
            k = self.list_size
            pick = sorted(torch.randperm(len(item.ranking), generator=g)[:k].tolist())  # rank positions
            order = [item.ranking[r] for r in pick]  # image indices, best first
            flip = self.random_flip and bool(torch.rand((), generator=g) < 0.5)
            images = [item.images[i] for i in order]
            spots = [place_image(im.width, im.height, res, center_crop=self.center_crop, flip=flip, generator=g)
                     for im in images]
            return Example([(im, pl, key_of(im, pl)) for im, pl in zip(images, spots)],
                           ["" if drop else item.caption] * k, [float(item.scores[i]) for i in order], 1.0, None, g)
        if self.kind == "feedback":
            spot = place_image(item.image.width, item.image.height, res, center_crop=self.center_crop,
                               random_flip=self.random_flip, generator=g)
            return Example([(item.image, spot, key_of(item.image, spot))], ["" if drop else item.prompt],
                           None, 1.0, bool(item.desirable), g)
        w, l = place_pair(item, res, center_crop=self.center_crop, random_flip=self.random_flip, generator=g)
        weight = float(getattr(item, "weight", 1.0))
        if self.kind == "chosen":
            return Example([(item.chosen, w, key_of(item.chosen, w))], ["" if drop else item.prompt],
                           None, weight, None, g)
        p_l = item.prompt_rejected if item.prompt_rejected is not None else item.prompt
        sc = getattr(item, "scores", None)
        return Example([(item.chosen, w, key_of(item.chosen, w)), (item.rejected, l, key_of(item.rejected, l))],
                       ["" if drop else item.prompt, "" if drop else p_l],
                       list(sc) if sc is not None else [float("nan")] * 2, weight, None, g, getattr(item, "user", None))

    def _pixels_or_latent(self, image, placement, key: str, where: str = "") -> tuple:
        """``(image, placement, key, cached latent or None, pixels or None)``; an image that does not decode
        is a skipped row (``undecodable image``), one past ``pairs.MAX_IMAGE_PIXELS`` too (``image too large``)."""
        from diffalign.data.pairs import SkipRow, skip_reason
        from diffalign.data.transforms import render

        if self.cache is not None:
            found = self.cache.get_latents([key])
            if key in found:
                return image, placement, key, found[key], None
        try:
            pixels = render(image, placement, self.resolution)
        except ValueError as e:
            raise SkipRow(skip_reason(e), str(e), where) from None
        return image, placement, key, None, pixels

    # ---- the training process: workers, encoding, noise
    def start(self, first_step: int, last_step: int, process: int, num_processes: int) -> None:
        """Start ``num_workers`` DataLoader workers reading the micro-batches of steps ``first_step`` to
        ``last_step`` for this process (nothing with ``num_workers: 0``: :meth:`batch` reads inline)."""
        self.close()
        if self.examples is None or self.num_workers <= 0 or last_step <= first_step:
            return
        ga = self.gradient_accumulation_steps
        micro_batches = _MicroBatches(self, process, num_processes)
        loader = torch.utils.data.DataLoader(
            micro_batches, batch_size=None, sampler=range(first_step * ga, last_step * ga),
            num_workers=self.num_workers, prefetch_factor=self.prefetch_factor,
            pin_memory=torch.device(self.backbone.device).type == "cuda", collate_fn=_as_is)
        self._loader = iter(loader)
        self._next = (first_step, 0, process, num_processes)

    def close(self) -> None:
        """Stop the workers (if any)."""
        self._loader, self._next = None, None

    def batch(self, step: int, micro: int, process: int, num_processes: int) -> TrainBatch:
        """The micro-batch at a run position: from the workers when they have read ahead to it, else read
        here; the same batch either way."""
        if self._loader is not None and self._next == (step, micro, process, num_processes):
            cpu = next(self._loader)
            s, m = divmod(step * self.gradient_accumulation_steps + micro + 1, self.gradient_accumulation_steps)
            self._next = (s, m, process, num_processes)
        else:
            cpu = self.read(step, micro, process, num_processes)
        return self.finish(cpu)

    def finish(self, cpu: CpuBatch) -> TrainBatch:
        """Count the rows read, encode the rows the cache missed and the prompts, and draw each example's
        noise and timestep (continuing its generator)."""
        self._account(cpu.reads)
        device = self.backbone.device
        res = self.resolution
        latents = self.encode_latents(cpu.pixels_of, cpu.keys, known=cpu.known_latents())
        latents = latents.to(device)
        cond = self.encode_text(cpu.prompts).to(device)
        if getattr(self.backbone, "family", None) == "sdxl":
            cond.time_ids = self.backbone.time_ids(
                torch.tensor([pl.original_size for pl in cpu.placements]),
                torch.tensor([pl.crop_top_left for pl in cpu.placements]), (res, res)).to(device)
        gens = []
        for state in cpu.generator_states:
            g = torch.Generator()
            g.set_state(state.clone())
            gens.append(g)
        noisy = self.backbone.forward_process.noise_examples(latents, gens, group_size=cpu.group)
        return TrainBatch(
            latents=latents, noise=noisy.noise, x_t=noisy.x_t, target=noisy.target,
            timesteps=noisy.timesteps, cond=cond, weights=torch.tensor(cpu.weights, device=device),
            desirable=torch.tensor(cpu.desirable, device=device) if cpu.desirable is not None else None,
            prompts=cpu.prompts,
            scores=None if cpu.scores is None else torch.tensor(cpu.scores, device=device, dtype=torch.float32),
            users=cpu.users,
        )

    def _account(self, reads: list[tuple]) -> None:
        """Count each row read for the first time (kept, tie, or skipped with its reason); print the counts
        once the first optimizer step's batches are read; stop when the skipped share passes
        ``data.max_bad_fraction``."""
        import numpy as np

        if self.stats is None or self.examples is None:
            return
        if self._seen is None:
            self._seen = np.zeros(self.examples.num_rows(), dtype=bool)
        for row, outcome in reads:
            if self._seen[row]:
                continue
            self._seen[row] = True
            self.stats.rows += 1
            if outcome is None:
                self.stats.kept += 1
            elif outcome[0] == "tie":
                self.stats.ties_dropped += 1
            else:
                self.stats.skip_bad(outcome[1], outcome[2], outcome[0])
        self._finished += 1
        if self._finished == self.gradient_accumulation_steps and self.verbose:
            report_data_stats(self.stats, f"data (first step, {self.source_name})")
        judged = min(self.examples.num_rows(), MIN_ROWS_JUDGED)
        if self.stats.rows >= judged and self.stats.bad_images > self.max_bad_fraction * self.stats.rows:
            from diffalign.errors import UsageError

            st = self.stats
            first = f" (first: {st.bad_rows[0]}: {st.bad_reasons[0]})" if st.bad_rows else ""
            why = ", ".join(f"{n} {k}" for k, n in sorted(st.skipped.items()))
            raise UsageError(f"{self.source_name}: {st.bad_images} of the {st.rows} rows read were skipped ({why})"
                             f"{first}: more than data.max_bad_fraction={self.max_bad_fraction:g}. Fix the data or "
                             "raise the threshold (data.strict=true stops at the first bad row).")

    def report(self, when: str) -> None:
        """Print the counts so far and the first skipped rows (e.g. ``when="end of run"``)."""
        if self.stats is not None and self.examples is not None and self.verbose:
            report_data_stats(self.stats, f"data ({when}, {self.source_name})")

    def step_scalars(self) -> dict[str, int]:
        """The data counts so far, for the metrics rows: ``data/rows_read``, ``data/kept``,
        ``data/ties_dropped``, ``data/skipped`` and ``data/skipped_<reason>``."""
        st = self.stats
        if st is None or self.examples is None:
            return {}
        out = {"data/rows_read": st.rows, "data/kept": st.kept, "data/ties_dropped": st.ties_dropped,
               "data/skipped": st.bad_images}
        out.update({"data/skipped_" + k.replace(" ", "_"): n for k, n in sorted(st.skipped.items())})
        return out

    # ---- encoding through the cache
    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor | Callable[[list[int]], torch.Tensor], keys: list[str],
                       known: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """VAE latents ``[N, C, h, w]`` (the posterior mean) of the ``N`` images named by ``keys``.

        ``pixels``: ``[N, 3, H, W]`` in [-1, 1], or a function giving the pixels of the rows at the given
        indices; it is called for the misses only (of ``known`` latents, then of the cache), so a cached
        step decodes no image."""
        encode = lambda px: self.backbone.encode_images(px.to(self.backbone.device), sample=False).float().cpu()  # noqa: E731
        pixels_of = pixels if callable(pixels) else (lambda idx: pixels[idx])
        known = dict(known or {})
        if not self.encoders_loaded:
            encode = lambda px: self._not_encoded(len(px), "image")  # noqa: E731
        if self.cache is None:
            missing = [i for i, k in enumerate(keys) if k not in known]
            if missing:
                fresh = encode(pixels_of(missing))
                known.update({keys[i]: fresh[j] for j, i in enumerate(missing)})
            return torch.stack([known[k] for k in keys])
        found = {**self.cache.get_latents([k for k in keys if k not in known]), **known}
        missing = [i for i, k in enumerate(keys) if k not in found]
        if missing:
            fresh = encode(pixels_of(missing))
            self.cache.put_latents({keys[i]: fresh[j] for j, i in enumerate(missing)})
            found.update({keys[i]: fresh[j] for j, i in enumerate(missing)})
        return torch.stack([found[k] for k in keys])

    def _not_encoded(self, n: int, what: str):
        raise RuntimeError(f"{n} {what}(s) of this batch are not in the encoded set's cache, and this run loaded no "
                           "encoders for them (the set was found encoded by 'diffalign data encode'): was the cache "
                           "made from another recipe? Run 'diffalign data encode' again with this recipe")

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> Conditioning:
        """Text conditioning of ``prompts`` through the cache (the text encoders run for misses only)."""
        encode = lambda ps: self.backbone.encode_prompt(ps).to("cpu")  # noqa: E731
        if not self.encoders_loaded:
            encode = lambda ps: self._not_encoded(len(ps), "prompt")  # noqa: E731
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


class _MicroBatches(torch.utils.data.Dataset):
    """Micro-batch ``k`` (step ``k // accumulation``, micro ``k % accumulation``) of one process, as a
    map-style dataset for the DataLoader's workers."""

    def __init__(self, data: TrainingData, process: int, num_processes: int):
        self.data, self.process, self.num_processes = data, process, num_processes

    def __getitem__(self, k: int) -> CpuBatch:
        step, micro = divmod(k, self.data.gradient_accumulation_steps)
        return self.data.read(step, micro, self.process, self.num_processes)


def _as_is(batch: CpuBatch) -> CpuBatch:
    return batch


def load_training_data(recipe, kind: str, backbone, output_dir: Path, accelerator=None) -> TrainingData:
    """Open the recipe's data source for random access (nothing of it read into memory but what locates
    rows; :func:`diffalign.data.examples.open_examples`) and set up the latent cache.

    Rows are read when a step needs them, in ``data.num_workers`` DataLoader workers; bad rows are met
    then, counted and reported (:meth:`TrainingData.finish`)."""
    from diffalign.data.cache import LatentCache
    from diffalign.data.examples import open_examples, ranked_list_size
    from diffalign.data.pairs import DataStats

    d = recipe.data
    if not d.source:
        raise ValueError("the recipe has no data.source (a parquet/JSONL path or a hub dataset id)")
    examples, kind = open_examples(d, kind)
    main = accelerator is None or accelerator.is_main_process
    source_name = d.source if isinstance(d.source, str) else ", ".join(map(str, d.source)) \
        if isinstance(d.source, (list, tuple)) else "dataset"
    if main:
        print(f"data: {source_name}: {examples.num_rows()} rows, read as the steps need them "
              f"({d.num_workers} DataLoader workers)")
    root = cache_root(recipe, output_dir)
    cache = None if root is None else LatentCache(root, namespace=cache_namespace(recipe, str(backbone.vae.dtype)))
    list_size = ranked_list_size(examples.rows) if kind == "ranked" else 2
    return TrainingData(
        items=None, kind=kind, backbone=backbone, resolution=d.resolution, batch_size=recipe.train.batch_size,
        gradient_accumulation_steps=recipe.train.gradient_accumulation_steps, seed=recipe.train.seed,
        center_crop=d.center_crop, random_flip=d.random_flip, caption_dropout=d.caption_dropout, cache=cache,
        stats=DataStats(rows=examples.ties_dropped, ties_dropped=examples.ties_dropped), list_size=list_size, examples=examples, strict=d.strict,
        max_bad_fraction=d.max_bad_fraction, source_name=source_name, num_workers=d.num_workers,
        prefetch_factor=d.prefetch_factor, verbose=main,
        encoders_loaded=not getattr(backbone, "encoders_dropped", False),
    )


def cache_root(recipe, output_dir: Path | None = None) -> Path | None:
    """The latent cache's folder: ``data.cache_dir``, else ``<train.output_dir>/cache``; None when
    ``data.cache_dir`` is ``""`` (no cache)."""
    d = recipe.data
    if d.cache_dir == "":
        return None
    return Path(d.cache_dir) if d.cache_dir else Path(output_dir or recipe.train.output_dir) / "cache"


def cache_namespace(recipe, vae_dtype: str) -> str:
    """The cache namespace of a model and image preparation: what changes every latent and embedding."""
    m, d = recipe.model, recipe.data
    return f"{stable_seed(m.pretrained, m.revision, m.variant, d.resolution, d.center_crop, vae_dtype):016x}"


def report_data_stats(stats, label: str = "data") -> None:
    """Print the counts (rows read, kept, ties dropped, rows skipped by reason) and the first skipped rows
    with why."""
    print(f"{label}: {stats}")
    for row, why in list(zip(stats.bad_rows, stats.bad_reasons))[:5]:
        print(f"  skipped {row}: {why}" if why else f"  skipped {row}")
    if stats.bad_images > len(stats.bad_rows[:5]):
        print(f"  ... {stats.bad_images - len(stats.bad_rows[:5])} more skipped")


# ---- sets pre-encoded by `diffalign data encode` (diffalign.trainers.encode)

def encoded_set_id(recipe) -> str:
    """What identifies an encoded set within a cache namespace: the data source and what decides which
    placements and prompts training can draw."""
    d = recipe.data
    source = d.source if isinstance(d.source, str) else "|".join(map(str, d.source))
    return f"{stable_seed(source, d.format, d.split, d.max_samples, d.random_flip, d.caption_dropout > 0):016x}"


def manifest_path(recipe, vae_dtype: str = "torch.float32") -> Path | None:
    """Where the manifest of the recipe's encoded set is (or would be); None with the cache off."""
    root = cache_root(recipe)
    if root is None:
        return None
    return root / cache_namespace(recipe, vae_dtype) / f"encoded-{encoded_set_id(recipe)}.json"


def find_encoded_set(recipe) -> dict | None:
    """The manifest of a complete ``diffalign data encode`` of the recipe's data and model, or None."""
    import json

    if not isinstance(recipe.data.source, (str, list, tuple)):  # a datasets.Dataset object: not identifiable
        return None
    path = manifest_path(recipe)
    if path is None or not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if manifest.get("complete") else None
