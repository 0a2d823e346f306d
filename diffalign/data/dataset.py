"""A map-style dataset of preference pairs and the collate that packs them for the trainers."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch

from diffalign.data.pairs import DataStats, PreferencePair
from diffalign.data.transforms import Placement, PreparedImage, prepare_pair

Item = tuple[PreferencePair, PreparedImage, PreparedImage]


def _seed(*parts) -> int:
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


class PreferenceDataset(torch.utils.data.Dataset):
    """Pairs read into memory (small and medium sets), prepared on access.

    ``dataset[i]`` is ``(pair, chosen, rejected)`` with both images prepared by :func:`prepare_pair`;
    random crops and flips come from a generator seeded by ``(seed, epoch, i)``, so an item is the
    same on every worker and every rerun. ``stats`` summarises what the reader kept and skipped.
    """

    def __init__(self, pairs: Iterable[PreferencePair], resolution: int, *, center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0, max_samples: int | None = None,
                 stats: DataStats | None = None):
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.epoch = 0
        self.stats = stats if stats is not None else DataStats()
        self.pairs: list[PreferencePair] = []
        for p in pairs:
            if max_samples is not None and len(self.pairs) >= max_samples:
                break
            self.pairs.append(p)
        if not self.pairs:
            raise ValueError(f"no usable preference pairs ({self.stats})")

    def set_epoch(self, epoch: int) -> None:
        """Draw new random crops/flips for a new epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Item:
        pair = self.pairs[i]
        g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, i))
        w, l = prepare_pair(pair, self.resolution, center_crop=self.center_crop, random_flip=self.random_flip,
                            generator=g)
        return pair, w, l


def placed_image_key(image, placement: Placement) -> str:
    """Cache key of one image at one placement: the image's content key (:func:`~diffalign.data.pairs.image_key`)
    and the crop/flip applied; the same for any row, pair or method that uses the image."""
    from diffalign.data.pairs import image_key

    top, left = placement.crop_top_left
    return f"image:{image_key(image)}|crop=({top}, {left})|flip={int(placement.flipped)}"


def latent_key(pair_key: str, role: str, image: Placement) -> str:
    """Cache key of one placed image: the pair's content key, its role, and the crop/flip applied."""
    top, left = image.crop_top_left
    return f"{pair_key}:{role}|crop=({top}, {left})|flip={int(image.flipped)}"


def collate_pairs(items: list[Item]) -> dict:
    """Pack ``(pair, chosen, rejected)`` items: winners first, then losers.

    Returns ``prompts`` [B], ``prompts_rejected`` [B] (``None`` when no pair has its own loser caption),
    ``pixels`` [2B, 3, H, W], ``original_sizes`` and ``crops_top_left`` [2B, 2] (``(h, w)`` and
    ``(top, left)``), ``keys`` [2B] latent-cache keys, ``weights`` [B].
    """
    if not items:
        raise ValueError("collate_pairs needs at least one item")
    pairs = [p for p, _, _ in items]
    images = [w for _, w, _ in items] + [l for _, _, l in items]
    has_own = any(p.prompt_rejected is not None for p in pairs)
    return {
        "prompts": [p.prompt for p in pairs],
        "prompts_rejected": [p.prompt_rejected if p.prompt_rejected is not None else p.prompt for p in pairs]
        if has_own else None,
        "pixels": torch.stack([im.pixels for im in images]),
        "original_sizes": torch.tensor([im.original_size for im in images], dtype=torch.long),
        "crops_top_left": torch.tensor([im.crop_top_left for im in images], dtype=torch.long),
        "keys": [latent_key(p.key, "chosen", w) for p, w, _ in items]
        + [latent_key(p.key, "rejected", l) for p, _, l in items],
        "weights": torch.tensor([float(p.weight) for p in pairs], dtype=torch.float32),
    }
