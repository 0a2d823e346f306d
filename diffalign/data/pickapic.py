"""Pick-a-Pic v2 preference data: local parquet, hub datasets, the no-images variant, WebDataset tars.

The schema (``yuvalkirstain/pickapic_v2``): ``jpg_0``, ``jpg_1`` (JPEG bytes), ``label_0`` (1: image 0
preferred, 0: image 1, 0.5: tie) and ``caption``. As in the official Diffusion-DPO code, ties are
dropped (and counted) by default and the winner is put first.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from diffalign.data.pairs import DataStats, PreferencePair, content_key, decode_image

REQUIRED = ("jpg_0", "jpg_1", "label_0", "caption")
VALID_LABELS = (0.0, 0.5, 1.0)


def _resolve_files(spec: str | Path | list) -> list[Path] | None:
    """Local parquet files for a path, directory, glob or list; ``None`` if ``spec`` looks like a hub id."""
    specs = spec if isinstance(spec, (list, tuple)) else [spec]
    files: list[Path] = []
    for s in specs:
        s = str(s)
        if any(ch in s for ch in "*?["):
            files += [Path(p) for p in sorted(glob.glob(s))]
        elif os.path.isdir(s):
            files += sorted(Path(s).glob("**/*.parquet")) + sorted(Path(s).glob("**/*.tar"))
        elif os.path.exists(s):
            files.append(Path(s))
        elif len(specs) == 1 and s.count("/") == 1 and not s.endswith((".parquet", ".tar", ".jsonl")):
            return None  # owner/name: a hub dataset id
        else:
            raise FileNotFoundError(f"no such data file or directory: {s}")
    if not files:
        raise FileNotFoundError(f"no parquet/tar files match {spec}")
    return files


def read_pickapic(
    source: str | Path | list,
    *,
    split: str = "train",
    drop_ties: bool = True,
    strict: bool = False,
    stats: DataStats | None = None,
    image_cache_dir: str | Path | None = None,
) -> Iterator[PreferencePair]:
    """Preference pairs, winner first, from Pick-a-Pic-schema data.

    ``source``: a parquet file, directory, glob or list of them; WebDataset ``.tar`` shards (members
    ``KEY.jpg_0``, ``KEY.jpg_1`` and ``KEY.json`` with ``caption`` and ``label_0``); or a hub dataset id,
    streamed with ``datasets``. Rows without image bytes but with ``image_0_url``/``image_1_url``
    (``pickapic_v2_no_images``) have their images fetched once into ``image_cache_dir``.

    Errors name the file, row and field: a missing column, a label outside {0, 0.5, 1}. An undecodable
    image skips the row and counts it (``strict=True``: an error naming the row).
    """
    stats = stats if stats is not None else DataStats()
    files = _resolve_files(source)
    if files is None:
        yield from _rows_to_pairs(_hub_rows(str(source), split), str(source), drop_ties, strict, stats, image_cache_dir)
        return
    for f in files:
        rows = _tar_rows(f) if f.suffix == ".tar" else _parquet_rows(f)
        yield from _rows_to_pairs(rows, str(f), drop_ties, strict, stats, image_cache_dir)


def _parquet_rows(path: Path) -> Iterator[dict]:
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    has_urls = {"image_0_url", "image_1_url"} <= names
    missing = [c for c in REQUIRED if c not in names and not (has_urls and c in ("jpg_0", "jpg_1"))]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; Pick-a-Pic data needs {list(REQUIRED)}")
    wanted = [c for c in (*REQUIRED, "image_0_url", "image_1_url", "caption_1") if c in names]
    for batch in pf.iter_batches(columns=wanted, batch_size=256):
        yield from batch.to_pylist()


def _tar_rows(path: Path) -> Iterator[dict]:
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, ext = member.name.partition(".")
            data = tar.extractfile(member).read()
            sample = samples.setdefault(key, {})
            if ext == "json":
                sample.update(json.loads(data))
            else:
                sample[ext] = data
    for key in sorted(samples):
        yield samples[key]


def _hub_rows(dataset_id: str, split: str) -> Iterator[dict]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"reading the hub dataset {dataset_id!r} needs `pip install datasets` "
                          "(or download its parquet files and pass their paths)") from e
    try:
        ds = datasets.load_dataset(dataset_id, split=split, streaming=True)
    except Exception as e:
        raise RuntimeError(f"could not open hub dataset {dataset_id!r} (split {split!r}): {e}. Offline, pass local "
                           "parquet files instead. yuvalkirstain/pickapic_v2 has been gone from the Hub since 2025: "
                           "use a mirror, or pickapic_v2_no_images (images fetched from their URLs)") from e
    yield from ds


def _fetch_url(url: str, cache_dir: Path) -> bytes:
    import urllib.request

    path = cache_dir / (content_key(url) + ".img")
    if path.exists():
        return path.read_bytes()
    with urllib.request.urlopen(url, timeout=30) as r:
        data = r.read()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return data


def _image_bytes(row: dict, i: int, cache_dir) -> bytes:
    data = row.get(f"jpg_{i}")
    if data is None and row.get(f"image_{i}_url"):
        cache = Path(cache_dir or Path.home() / ".cache" / "diffalign" / "pickapic_images")
        data = _fetch_url(row[f"image_{i}_url"], cache)
    if data is None:
        raise ValueError("no image bytes and no image URL")
    return data


def _rows_to_pairs(rows: Iterable[dict], where: str, drop_ties: bool, strict: bool, stats: DataStats,
                   cache_dir) -> Iterator[PreferencePair]:
    for i, row in enumerate(rows):
        stats.rows += 1
        src = f"{where}:row {i}"
        label = row.get("label_0")
        try:
            label = float(label)
        except (TypeError, ValueError):
            raise ValueError(f"{src}: field 'label_0' is {label!r}, not a number in {{0, 0.5, 1}}") from None
        if label not in VALID_LABELS:
            raise ValueError(f"{src}: field 'label_0' is {label}; Pick-a-Pic labels are 0, 0.5 (tie) or 1")
        if label == 0.5 and drop_ties:
            stats.ties_dropped += 1
            continue
        caption = row.get("caption")
        if not isinstance(caption, str):
            raise ValueError(f"{src}: field 'caption' is {caption!r}, not text")
        try:
            raw = [_image_bytes(row, j, cache_dir) for j in (0, 1)]
            imgs = [decode_image(b, f"{src} field 'jpg_{j}'") for j, b in enumerate(raw)]
        except Exception as e:
            if strict:
                raise ValueError(f"{src}: {e}") from None
            stats.bad_images += 1
            stats.bad_rows.append(src)
            continue
        w = 0 if label >= 0.5 else 1  # ties kept (drop_ties=False) put image 0 first
        stats.kept += 1
        yield PreferencePair(prompt=caption, chosen=imgs[w], rejected=imgs[1 - w], source=src,
                             key=content_key(raw[w], raw[1 - w], caption))


def write_pickapic_parquet(rows: Iterable[dict], path: str | Path) -> Path:
    """Write rows (``caption``, ``jpg_0``/``jpg_1`` bytes, ``label_0``) as Pick-a-Pic parquet, atomically.

    ``label_1 = 1 − label_0`` is written too. The file appears only once it is complete.
    """
    path = Path(path)
    rows = list(rows)
    for i, r in enumerate(rows):
        if float(r["label_0"]) not in VALID_LABELS:
            raise ValueError(f"row {i}: label_0 {r['label_0']} not in {{0, 0.5, 1}}")
    table = pa.table({
        "caption": pa.array([r["caption"] for r in rows], pa.string()),
        "jpg_0": pa.array([r["jpg_0"] for r in rows], pa.binary()),
        "jpg_1": pa.array([r["jpg_1"] for r in rows], pa.binary()),
        "label_0": pa.array([float(r["label_0"]) for r in rows], pa.float64()),
        "label_1": pa.array([1.0 - float(r["label_0"]) for r in rows], pa.float64()),
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
