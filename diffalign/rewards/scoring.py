"""Image inputs for scoring, and scoring them: the readers behind ``diffalign score`` and ``diffalign data label``.

A folder of image files (sorted file-name order), a parquet file (``image`` column or Pick-a-Pic
``jpg_0``/``jpg_1``), prompts from a .txt/.json/.csv file; :func:`score_images` runs rewards over
them batch by batch. Bad input raises :class:`InputError` naming the file and row; an image that does not
decode is found by :func:`unreadable_images` first, so a caller can skip and report it.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from diffalign.errors import UsageError

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class InputError(UsageError):
    """Bad input (images, prompts file), reported with the file (and row) at fault."""


def list_images(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"{folder}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def _bytes_of(cell, path: Path, row: int, column: str) -> bytes:
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if not isinstance(cell, (bytes, bytearray)):
        raise InputError(f"{path}: row {row}, column {column!r}: expected image bytes, got {type(cell).__name__}")
    return bytes(cell)


def parquet_images(path: Path) -> tuple[list[str], list, list[str] | None]:
    """``(names, sources, prompts or None)`` of a parquet file (sources are raw bytes)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path).to_pylist()
    names, sources, prompts = [], [], []
    for i, row in enumerate(table):
        text = row.get("prompt", row.get("caption"))
        columns = ["image"] if "image" in row else [c for c in ("jpg_0", "jpg_1") if c in row]
        if not columns:
            raise InputError(f"{path}: row {i} has neither an 'image' column nor Pick-a-Pic 'jpg_0'/'jpg_1'")
        for c in columns:
            names.append(str(row.get("file_name", i)) if c == "image" else f"{i}_{c[-1]}")
            sources.append(_bytes_of(row[c], path, i, c))
            prompts.append(text)
    return names, sources, (prompts if all(p is not None for p in prompts) else None)


def read_prompts(path: Path, names: list[str]) -> list[str]:
    """Prompts for ``names`` (image file names, in order) from a .txt, .json or .csv file."""
    if not path.is_file():
        raise InputError(f"{path}: prompts file not found")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = [line.rstrip("\n") for line in path.read_text().splitlines()]
        while lines and not lines[-1].strip():
            lines.pop()
        if len(lines) != len(names):
            raise InputError(f"{path}: {len(lines)} prompt lines for {len(names)} images (one line per image, "
                             "in sorted file-name order)")
        return lines
    if suffix == ".json":
        data = json.loads(path.read_text())
        if isinstance(data, list):
            if len(data) != len(names):
                raise InputError(f"{path}: {len(data)} prompts for {len(names)} images")
            return [str(p) for p in data]
        mapping = {str(k): str(v) for k, v in data.items()}
    elif suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        key = next((k for k in ("file_name", "image", "file") if rows and k in rows[0]), None)
        if key is None or "prompt" not in rows[0]:
            raise InputError(f"{path}: CSV needs a 'file_name' (or 'image') column and a 'prompt' column")
        mapping = {r[key]: r["prompt"] for r in rows}
    else:
        raise InputError(f"{path}: prompts must be .txt, .json or .csv")
    out = []
    for name in names:
        prompt = mapping.get(name, mapping.get(Path(name).stem))
        if prompt is None:
            raise InputError(f"{path}: no prompt for image {name!r}")
        out.append(prompt)
    return out


def _open(source) -> Image.Image:
    """The RGB image of a file or bytes (transparency composited on white, as training does)."""
    from diffalign.data.pairs import to_rgb

    im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    return to_rgb(im)


def unreadable_images(sources: list) -> list[tuple[int, str]]:
    """``(index, reason)`` of every source (file or bytes) PIL cannot decode, in order."""
    bad = []
    for i, source in enumerate(sources):
        try:
            _open(source)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append((i, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"))
    return bad


def _batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def score_images(rewards: dict, sources: list, prompts: list[str], batch_size: int) -> dict[str, list[float]]:
    """Scores of every reward on every image, batch by batch, with a progress bar."""
    from tqdm.auto import tqdm

    out: dict[str, list[float]] = {name: [] for name in rewards}
    with tqdm(total=len(sources), desc="scoring", unit="img", file=sys.stderr) as bar:
        for sl in _batches(len(sources), batch_size):
            images = [_open(s) for s in sources[sl]]
            for name, reward in rewards.items():
                out[name].extend(float(v) for v in reward.score(images, prompts[sl]).detach().cpu())
            bar.update(len(images))
    return out
