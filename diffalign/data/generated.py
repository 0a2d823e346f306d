"""A folder of generated images in GenEval's layout, read back: ``NNNNN/metadata.jsonl`` (the prompt's
line) and ``NNNNN/samples/SSSS.png``, as ``diffalign eval`` writes it (:mod:`diffalign.eval.generate`).

``diffalign eval`` scores these folders and ``diffalign data label`` turns them into preference data,
so the reader lives with the data sources, below both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

METADATA_FILE = "metadata.jsonl"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class GeneratedImage:
    """One image of a generated folder and the prompt it was made for."""

    prompt_index: int
    sample_index: int
    path: Path
    prompt: str
    category: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        """``(prompt_index, sample_index)``: the same for the same prompt and seed in any run."""
        return self.prompt_index, self.sample_index

    def group(self, breakdown: str) -> str | None:
        """The image's group for a per-category table: its ``category``, or a metadata field."""
        value = self.category if breakdown == "category" else self.metadata.get(breakdown)
        return None if value is None else str(value)


def _read_metadata(path: Path) -> dict:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty; expected one JSON metadata line")
    try:
        meta = json.loads(lines[0])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line 1: not JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
        raise ValueError(f"{path}, line 1: expected a JSON object with a 'prompt' field")
    return meta


def read_folder(folder: str | Path, keys: Sequence[tuple[int, int]] | None = None) -> list[GeneratedImage]:
    """The images of a GenEval-layout folder, by prompt then sample index.

    ``keys``: the ``(prompt_index, sample_index)`` pairs wanted (each must exist); default: all
    images found. Each prompt folder (``00012``) needs a ``metadata.jsonl`` whose first line has
    ``prompt``; its category is ``tag`` for GenEval-format lines, else ``category``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of generated images")
    wanted = None if keys is None else {(int(i), int(j)) for i, j in keys}
    out: list[GeneratedImage] = []
    prompt_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    for pdir in prompt_dirs:
        index = int(pdir.name)
        if wanted is not None and not any(i == index for i, _ in wanted):
            continue
        meta_path = pdir / METADATA_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: missing (every prompt folder needs its metadata line)")
        meta = _read_metadata(meta_path)
        category = meta.get("tag") if "include" in meta else meta.get("category")
        samples = pdir / "samples"
        files = sorted(p for p in samples.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.stem.isdigit()) \
            if samples.is_dir() else []
        for f in files:
            item = GeneratedImage(index, int(f.stem), f, meta["prompt"], None if category is None else str(category),
                                  meta)
            if wanted is None or item.key in wanted:
                out.append(item)
    if wanted is not None:
        missing = sorted(wanted - {im.key for im in out})
        if missing:
            i, j = missing[0]
            raise FileNotFoundError(f"{folder}: {len(missing)} wanted image(s) missing, e.g. prompt {i} sample {j} "
                                    f"({i:05d}/samples/{j:04d}.png)")
    if not out:
        raise FileNotFoundError(f"{folder}: no images in GenEval layout (00000/samples/0000.png, ...)")
    return sorted(out, key=lambda im: im.key)
