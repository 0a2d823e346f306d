"""``diffalign score``: score a folder (or parquet file) of images with one or more rewards.

    diffalign score --reward pickscore,hpsv2.1 --images outputs/ --prompts prompts.txt --out scores.csv

Inputs:
  --images DIR      image files (.png .jpg .jpeg .webp .bmp), taken in sorted file-name order;
  --images X.parquet  one image per row in an ``image`` column (bytes, or a ``{"bytes": ...}``
                    struct as written by ``datasets``), or Pick-a-Pic rows with ``jpg_0``/``jpg_1``
                    (two images per row, named ``<row>_0`` / ``<row>_1``); prompts may come from a
                    ``prompt`` or ``caption`` column.
  --prompts FILE    .txt: one prompt per line, matched to the images in sorted order (same count);
                    .json: ``{"file name": "prompt", ...}`` (file name with or without extension)
                    or a list in image order; .csv: columns ``file_name`` (or ``image``) and ``prompt``.
Output: one row per image: ``image, prompt, <one column per reward>``, as CSV (default, or stdout
when --out is not given) or JSON (a list of objects) when --out ends in .json.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reward", required=True, help="reward name(s), comma-separated (see --list)")
    parser.add_argument("--images", help="folder of images, or a parquet file")
    parser.add_argument("--prompts", help="prompts: .txt (one per line, sorted image order), .json or .csv mapping")
    parser.add_argument("--out", help="scores.csv or scores.json (default: CSV on stdout)")
    parser.add_argument("--mode", default="exact", choices=["exact", "differentiable"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reward-weights", action="append", default=[], metavar="NAME=PATH",
                        help="local weights (file, folder or hub id) for one reward; repeatable")
    parser.add_argument("--benchmark-scale", action="store_true", help="HPSv2: report 100 * cosine")


class InputError(ValueError):
    """Bad command-line input, reported with the file (and row) at fault."""


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
    im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    return im.convert("RGB")


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


def write_rows(rows: list[dict], out: str | None) -> None:
    """Rows as JSON (``out`` ends in .json) or CSV; the file is written whole (temp file, then rename)."""
    if out and out.endswith(".json"):
        text = json.dumps(rows, indent=1)
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    if not out:
        sys.stdout.write(text)
        return
    tmp = Path(out + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)


def run(args: argparse.Namespace) -> int:
    from diffalign.rewards.registry import list_rewards, load_reward

    names = [n.strip() for n in args.reward.split(",") if n.strip()]
    unknown = [n for n in names if n.lower() not in list_rewards() and not Path(n).is_dir()]
    if unknown:
        print(f"error: unknown reward(s) {unknown}; registered: {', '.join(list_rewards())}", file=sys.stderr)
        return 2
    if not args.images:
        print("error: --images is required", file=sys.stderr)
        return 2
    weights = dict(w.split("=", 1) for w in args.reward_weights)
    try:
        path = Path(args.images)
        if path.is_dir():
            files = list_images(path)
            image_names, sources, parquet_prompts = [f.name for f in files], files, None
        elif path.suffix == ".parquet" and path.is_file():
            image_names, sources, parquet_prompts = parquet_images(path)
        else:
            raise InputError(f"{path}: --images must be a folder or a .parquet file")
        if args.prompts:
            prompts = read_prompts(Path(args.prompts), image_names)
        elif parquet_prompts is not None:
            prompts = parquet_prompts
        else:
            raise InputError("--prompts is required (the images carry no prompts)")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rewards = {}
    for n in names:
        kw = {"mode": args.mode, "batch_size": args.batch_size}
        if n in weights:
            kw["weights"] = weights[n]
        if n.lower().startswith("hpsv2") and args.benchmark_scale:
            kw["benchmark_scale"] = True
        rewards[n] = load_reward(n, **kw).to(args.device)
    scores = score_images(rewards, sources, prompts, args.batch_size)
    rows = [{"image": name, "prompt": prompt, **{n: scores[n][i] for n in names}}
            for i, (name, prompt) in enumerate(zip(image_names, prompts))]
    write_rows(rows, args.out)
    if args.out:
        print(f"wrote {len(rows)} rows to {args.out}", file=sys.stderr)
    return 0
