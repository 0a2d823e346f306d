"""Synthetic preference data: score N images per prompt with reward models, write pairs or ranked lists.

    diffalign data label IMAGES [--prompts FILE] --reward pickscore,hpsv2.1 --out pairs.parquet

Input (``IMAGES``), read with the readers of ``diffalign score`` and ``diffalign eval``:

- a GenEval-layout folder: ``NNNNN/metadata.jsonl`` (first line a JSON object with ``prompt``) and
  ``NNNNN/samples/*.png``, as ``diffalign eval`` writes it;
- a flat folder of images with ``--prompts``: a .csv (``file_name``/``image`` and ``prompt``
  columns), a .json mapping ``{file name: prompt}`` or list, or a .txt with one prompt per image
  in sorted file-name order;
- a parquet file with an ``image`` column (or Pick-a-Pic ``jpg_0``/``jpg_1``) and ``prompt`` or
  ``caption``.

Images with the same prompt text form a group. Each reward scores every image; each reward's
scores are normalised over the whole input (z-score with the sample standard deviation,
``normalize="dataset"``; or the card's fixed mean/std, ``"card"``; or left raw, ``"none"``) and
averaged with optional weights
(:func:`diffalign.rewards.combine.weighted_sum` divided by the sum of the weights). The combined
score ``s`` ranks each group.

Pairs (``output="pairs"``, a Pick-a-Pic v2 parquet read by :func:`diffalign.data.pickapic.read_pickapic`):
``caption``, ``jpg_0`` (the winner's file bytes, unchanged), ``jpg_1`` (the loser's), ``label_0 = 1``,
``label_1 = 0``, ``score_0`` / ``score_1`` (the combined scores ``s``, for SmPO's smoothed preference). ``pairs="best-worst"`` makes one pair per prompt, the highest against the lowest
``s``; ``pairs="all"`` makes every pair of a group. The minimum-margin filter (as FiFA filters
pairs by reward margin) drops a pair when ``s_winner − s_loser < min_margin``, in the units of the
combined score (for ``"dataset"``: an average of z-scores, so 1.0 is one standard deviation of a
single reward); exact ties are always dropped.

Ranked lists (``output="ranked"``, for RankDPO), one record per prompt with at least two images:

    caption   the prompt
    images    JSONL: image paths relative to the JSONL file's folder; parquet: the image bytes
    names     the images' names in the input (relative paths, or parquet row names)
    scores    the combined score s of each image, in the order of ``images``
    ranking   indices into ``images``, best first (ties keep input order)
    rewards   {reward name: [raw score of each image]} (in parquet: that object as a JSON string)

A list is dropped when its spread ``max s − min s`` is below ``min_margin`` (or zero). JSONL is
written for ``.jsonl`` outputs, parquet (``images`` as ``list<binary>``) for ``.parquet``;
:func:`read_ranked` reads both. Every output is written whole or not at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from diffalign.data.files import atomic_write

OUTPUTS = ("pairs", "ranked")
PAIR_MODES = ("best-worst", "all")
NORMALIZE = {"dataset": "batch", "card": "fixed", "none": None}  # our name -> weighted_sum's


@dataclass
class ImageItem:
    """One input image: its name in the input, its prompt, and its file path or bytes."""

    name: str
    prompt: str
    source: Path | bytes

    def read_bytes(self) -> bytes:
        return self.source if isinstance(self.source, bytes) else self.source.read_bytes()


@dataclass
class LabelStats:
    """What labelling saw and wrote."""

    images: int = 0
    prompts: int = 0
    single_image_prompts: int = 0
    pairs: int = 0
    lists: int = 0
    below_margin: int = 0
    ties: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def __str__(self) -> str:
        written = f"{self.pairs} pairs" if self.pairs or not self.lists else f"{self.lists} ranked lists"
        return (f"{self.images} images of {self.prompts} prompts -> {written}; dropped: {self.below_margin} below "
                f"the margin, {self.ties} ties, {self.single_image_prompts} prompts with one image")


@dataclass
class RankedList:
    """One prompt's images, their combined scores and ranking (best first), as :func:`read_ranked` returns it."""

    caption: str
    images: list[Image.Image]
    names: list[str]
    scores: list[float]
    ranking: list[int]
    rewards: dict[str, list[float]] = field(default_factory=dict)


# ---------------------------------------------------------------------------- input


def _is_geneval_layout(folder: Path) -> bool:
    return any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())


def read_images(images: str | os.PathLike, prompts: str | os.PathLike | None = None) -> list[ImageItem]:
    """The images of a GenEval-layout folder, of a flat folder with a ``prompts`` file, or of a parquet
    file (layouts in the module docstring). Errors name the file and the image without a prompt."""
    from diffalign.rewards.scoring import (
        InputError,
        list_images,
        parquet_images,
        read_prompts,
    )

    path = Path(images)
    if path.is_dir() and _is_geneval_layout(path):
        if prompts is not None:
            raise InputError(f"{path}: a GenEval-layout folder takes its prompts from NNNNN/metadata.jsonl; "
                             "do not pass --prompts")
        from diffalign.data.generated import read_folder

        items = [ImageItem(im.path.relative_to(path).as_posix(), im.prompt, im.path) for im in read_folder(path)]
    elif path.is_dir():
        files = list_images(path)
        if prompts is None:
            raise InputError(f"{path}: a flat folder of images needs --prompts (a .csv with file_name and prompt "
                             "columns, a .json mapping, or a .txt), or use the GenEval layout NNNNN/samples/*.png "
                             "with NNNNN/metadata.jsonl")
        texts = read_prompts(Path(prompts), [f.name for f in files])
        items = [ImageItem(f.name, t, f) for f, t in zip(files, texts)]
    elif path.suffix == ".parquet" and path.is_file():
        names, sources, texts = parquet_images(path)
        if prompts is not None:
            texts = read_prompts(Path(prompts), names)
        elif texts is None:
            raise InputError(f"{path}: rows without a 'prompt' or 'caption'; pass --prompts")
        items = [ImageItem(n, t, s) for n, t, s in zip(names, texts, sources)]
    else:
        raise InputError(f"{path}: not a folder of images or a .parquet file")
    for it in items:
        if not isinstance(it.prompt, str) or not it.prompt.strip():
            where = prompts if prompts is not None else path
            raise InputError(f"{where}: image {it.name!r} has an empty prompt")
    return items


def group_by_prompt(items: Sequence[ImageItem]) -> dict[str, list[int]]:
    """``{prompt: [indices into items]}``, prompts in order of first appearance."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        groups.setdefault(it.prompt, []).append(i)
    return groups


# ---------------------------------------------------------------------------- scores


def combine_scores(scores: Mapping[str, torch.Tensor], weights: Mapping[str, float] | None = None,
                   normalize: str = "dataset", stats: Mapping[str, tuple[float, float]] | None = None) -> torch.Tensor:
    """The combined score ``[N]``: each reward's scores ``[N]`` normalised (``"dataset"``: z-score over
    all N images; ``"card"``: ``stats``; ``"none"``), then averaged with ``weights`` (default 1 each)."""
    from diffalign.rewards.combine import weighted_sum

    if normalize not in NORMALIZE:
        raise ValueError(f"normalize must be one of {tuple(NORMALIZE)}, got {normalize!r}")
    weights = {name: float((weights or {}).get(name, 1.0)) for name in scores}
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"reward weights must sum to a positive number, got {weights}")
    return weighted_sum(scores, weights, NORMALIZE[normalize], stats) / total


def card_stats(rewards: Mapping[str, object]) -> dict[str, tuple[float, float]]:
    """``{name: (mean, std)}`` from each reward's card ``normalization`` (an error naming a reward without)."""
    out = {}
    for name, r in rewards.items():
        norm = r.card.normalization if getattr(r, "card", None) else None
        if not norm:
            raise ValueError(f"reward {name!r} has no card normalization (mean, std); use normalize='dataset'")
        out[name] = (float(norm["mean"]), float(norm["std"]))
    return out


def ranked_pairs(indices: Sequence[int], s: torch.Tensor, mode: str) -> list[tuple[int, int, float]]:
    """``(winner, loser, margin)`` pairs of one group (``indices`` into ``s [N]``): the best against
    the worst (``"best-worst"``) or every pair (``"all"``); margin = ``s_winner − s_loser`` >= 0."""
    if mode not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {PAIR_MODES}, got {mode!r}")
    order = sorted(indices, key=lambda i: -float(s[i]))  # stable: ties keep input order
    if mode == "best-worst":
        return [(order[0], order[-1], float(s[order[0]] - s[order[-1]]))]
    return [(order[a], order[b], float(s[order[a]] - s[order[b]]))
            for a in range(len(order)) for b in range(a + 1, len(order))]


# ---------------------------------------------------------------------------- output


def _ranked_records(items, groups, s, raw, out: Path, as_bytes: bool) -> list[dict]:
    records = []
    for prompt, idx in groups.items():
        ranking = sorted(range(len(idx)), key=lambda k: -float(s[idx[k]]))
        if as_bytes:
            images = [items[i].read_bytes() for i in idx]
        else:  # paths relative to the output's folder
            images = [os.path.relpath(Path(items[i].source).resolve(), out.parent.resolve()) for i in idx]
        records.append({"caption": prompt, "images": images, "names": [items[i].name for i in idx],
                        "scores": [float(s[i]) for i in idx], "ranking": ranking,
                        "rewards": {name: [float(v[i]) for i in idx] for name, v in raw.items()}})
    return records


def write_ranked(records: list[dict], out: Path) -> None:
    """Ranked-list records as JSONL (``.jsonl``) or parquet (``.parquet``), atomically."""
    if out.suffix == ".jsonl":
        atomic_write(out, lambda tmp: tmp.write_text("".join(json.dumps(r) + "\n" for r in records)))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "caption": pa.array([r["caption"] for r in records], pa.string()),
        "images": pa.array([r["images"] for r in records], pa.list_(pa.binary())),
        "names": pa.array([r["names"] for r in records], pa.list_(pa.string())),
        "scores": pa.array([r["scores"] for r in records], pa.list_(pa.float64())),
        "ranking": pa.array([r["ranking"] for r in records], pa.list_(pa.int64())),
        "rewards": pa.array([json.dumps(r["rewards"]) for r in records], pa.string()),
    })
    atomic_write(out, lambda tmp: pq.write_table(table, tmp))


def read_ranked(path: str | os.PathLike) -> Iterator[RankedList]:
    """Ranked lists written by :func:`label` (``.jsonl``: image paths relative to the file's folder;
    ``.parquet``: image bytes). In parquet, ``rewards`` is stored as a JSON string."""
    import io

    path = Path(path)
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            r = json.loads(line)
            images = []
            for p in r["images"]:
                f = Path(p) if os.path.isabs(p) else path.parent / p
                if not f.is_file():
                    raise FileNotFoundError(f"{path}, line {n}: image {p!r} not found (paths are relative to "
                                            f"{path.parent})")
                with Image.open(f) as im:
                    images.append(im.convert("RGB"))
            yield RankedList(r["caption"], images, r["names"], r["scores"], r["ranking"], r.get("rewards", {}))
        return
    import pyarrow.parquet as pq

    for r in pq.read_table(path).to_pylist():
        images = [Image.open(io.BytesIO(b)).convert("RGB") for b in r["images"]]
        yield RankedList(r["caption"], images, r["names"], r["scores"], r["ranking"], json.loads(r["rewards"]))


# ---------------------------------------------------------------------------- the whole step


def label(images: str | os.PathLike, rewards: Mapping[str, object], out: str | os.PathLike, *,
          prompts: str | os.PathLike | None = None, output: str = "pairs", pairs: str = "best-worst",
          min_margin: float = 0.0, weights: Mapping[str, float] | None = None, normalize: str = "dataset",
          batch_size: int = 16) -> LabelStats:
    """Score every image of ``images`` with ``rewards`` (``{name: RewardModel}``), combine the scores
    and write preference pairs (Pick-a-Pic parquet) or ranked lists to ``out``; see the module
    docstring for the layouts, the combination and the filter. Returns the counts."""
    from diffalign.rewards.scoring import score_images

    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if pairs not in PAIR_MODES:
        raise ValueError(f"pairs must be one of {PAIR_MODES}, got {pairs!r}")
    if not rewards:
        raise ValueError("no rewards to label with")
    out = Path(out)
    if output == "pairs" and out.suffix != ".parquet":
        raise ValueError(f"{out}: pairs are written as Pick-a-Pic parquet; the output must end in .parquet")
    if output == "ranked" and out.suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{out}: ranked lists are written as .jsonl or .parquet")
    stats_in = card_stats(rewards) if normalize == "card" else None
    items = read_images(images, prompts)
    if output == "ranked" and out.suffix == ".jsonl" and any(isinstance(it.source, bytes) for it in items):
        raise ValueError(f"{images}: images from a parquet file have no paths for a JSONL list; write {out.stem}"
                         ".parquet instead")
    groups = group_by_prompt(items)
    raw_lists = score_images(dict(rewards), [it.source for it in items], [it.prompt for it in items], batch_size)
    raw = {name: torch.tensor(v, dtype=torch.float64) for name, v in raw_lists.items()}
    s = combine_scores(raw, weights, normalize, stats_in)

    stats = LabelStats(images=len(items), prompts=len(groups))
    kept_groups = {}
    for prompt, idx in groups.items():
        if len(idx) < 2:
            stats.single_image_prompts += 1
        else:
            kept_groups[prompt] = idx
    if output == "pairs":
        from diffalign.data.pickapic import write_pickapic_parquet

        chosen = []
        for prompt, idx in kept_groups.items():
            for w, l, margin in ranked_pairs(idx, s, pairs):
                if margin <= 0:
                    stats.ties += 1
                elif margin < min_margin:
                    stats.below_margin += 1
                else:
                    chosen.append((prompt, w, l))
        stats.pairs = len(chosen)
        rows = ({"caption": p, "jpg_0": items[w].read_bytes(), "jpg_1": items[l].read_bytes(), "label_0": 1.0,
                 "score_0": float(s[w]), "score_1": float(s[l])} for p, w, l in chosen)
        write_pickapic_parquet(rows, out)
        return stats
    spread_ok = {}
    for prompt, idx in kept_groups.items():
        spread = float(max(s[i] for i in idx) - min(s[i] for i in idx))
        if spread <= 0:
            stats.ties += 1
        elif spread < min_margin:
            stats.below_margin += 1
        else:
            spread_ok[prompt] = idx
    records = _ranked_records(items, spread_ok, s, raw, out, as_bytes=out.suffix == ".parquet")
    stats.lists = len(records)
    write_ranked(records, out)
    return stats
