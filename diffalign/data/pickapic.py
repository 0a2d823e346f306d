"""Pick-a-Pic v2 preference data: local parquet, hub datasets, the no-images variant, WebDataset tars.

The schema (``yuvalkirstain/pickapic_v2``): ``jpg_0``, ``jpg_1`` (JPEG bytes), ``label_0`` (1: image 0
preferred, 0: image 1, 0.5: tie) and ``caption``. As in the official Diffusion-DPO code, ties are
dropped (and counted) by default and the winner is put first.

Optional columns read when present: ``label_1`` (must equal ``1 - label_0``), ``caption_1`` (a
different caption for image 1, DCPO-style; ``caption`` is then image 0's), ``weight`` (per-pair loss
weight), ``score_0`` / ``score_1`` (reward scores of the two images, e.g. SmPO's PickScores; both or
neither) and ``user_id`` (who labelled the pair; read as text, PPD's user). ``pickapic_v2_no_images``
rows carry ``image_0_url`` / ``image_1_url`` instead of bytes: the images are fetched once and kept
under a cache directory, keyed by a hash of the URL.

WebDataset mirrors (``.tar``, ``.tar.gz``, ``.tgz``): one sample is the run of consecutive members
sharing a key (the member path up to the first dot of its file name), e.g.::

    00000042.jpg_0    image 0 bytes        (also accepted: 00000042.0.jpg / .0.png / .0.webp)
    00000042.jpg_1    image 1 bytes        (also accepted: 00000042.1.jpg / ...)
    00000042.json     {"caption": ..., "label_0": 1}   (and any optional column above, or image URLs)
    00000042.txt      the caption, if the JSON has none
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from diffalign.data.files import atomic_write
from diffalign.data.pairs import (
    BadRow,
    DataStats,
    EncodedImage,
    ImageLike,
    ImageTooLarge,
    PreferencePair,
    SkipRow,
    content_key,
    decode_image,
    skip_reason,
    to_rgb,
)

REQUIRED = ("jpg_0", "jpg_1", "label_0", "caption")
OPTIONAL = ("label_1", "caption_1", "weight", "score_0", "score_1", "image_0_url", "image_1_url", "user_id")
WRITABLE_OPTIONAL = ("caption_1", "weight", "score_0", "score_1", "user_id")
VALID_LABELS = (0.0, 0.5, 1.0)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_FILE_SUFFIXES = (".parquet", ".json", ".jsonl", ".gz", *TAR_SUFFIXES)


def default_image_cache_dir() -> Path:
    """Where fetched ``pickapic_v2_no_images`` images are kept: ``$DIFFALIGN_CACHE`` or the user cache."""
    base = os.environ.get("DIFFALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "diffalign")
    return Path(base) / "pickapic_images"


def _is_data_file(p: Path) -> bool:
    return p.name.endswith(".parquet") or p.name.endswith(TAR_SUFFIXES)


def _looks_like_hub_id(s: str) -> bool:
    """``owner/name`` that is not an existing path and does not end like a data file."""
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and not s.endswith(_FILE_SUFFIXES)


_SPLIT_FILE = re.compile(r"^(?P<split>\w+)-\d+-of-\d+")  # hub layout: data/train-00000-of-00645-....parquet


def _files_of_split(files: list[Path], split: str | None, where: str) -> list[Path]:
    """In a directory laid out as on the Hub (``SPLIT-00000-of-N...``), only the files of ``split``."""
    tagged = {f: m.group("split") for f in files if (m := _SPLIT_FILE.match(f.name))}
    if split is None or not tagged:
        return files
    chosen = [f for f in files if tagged.get(f) == split]
    if not chosen:
        raise FileNotFoundError(f"{where}: no files of split {split!r}; it has {sorted(set(tagged.values()))}")
    return chosen


def resolve_sources(spec: str | Path | list, split: str | None = None) -> list[Path] | None:
    """Local parquet/tar files for a path, directory, glob or list; ``None`` if ``spec`` is a hub id.

    A directory holding the Hub's file layout (``train-00000-of-00645-*.parquet``,
    ``validation_unique-00000-*.parquet``, ...) gives only the files of ``split``.
    """
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    files: list[Path] = []
    for s in specs:
        s = str(s)
        if any(ch in s for ch in "*?["):
            files += [Path(p) for p in sorted(glob.glob(s, recursive=True)) if _is_data_file(Path(p))]
        elif os.path.isdir(s):
            found = sorted(p for p in Path(s).rglob("*") if p.is_file() and _is_data_file(p))
            files += _files_of_split(found, split, s)
        elif os.path.exists(s):
            files.append(Path(s))
        elif len(specs) == 1 and _looks_like_hub_id(s):
            return None
        else:
            raise FileNotFoundError(f"no such data file or directory: {s}")
    if not files:
        raise FileNotFoundError(f"no .parquet or .tar files in {spec}")
    return files


def read_pickapic(
    source: str | Path | list,
    *,
    split: str = "train",
    drop_ties: bool = True,
    strict: bool = False,
    streaming: bool = True,
    stats: DataStats | None = None,
    image_cache_dir: str | Path | None = None,
    decode: bool = True,
) -> Iterator[PreferencePair]:
    """Preference pairs, winner first, from Pick-a-Pic-schema data.

    ``source``: a parquet file, directory (in the Hub's layout, only the files of ``split``), glob or
    list of them; WebDataset tar shards (layout in the module docstring); or a hub dataset id read
    with ``datasets.load_dataset(id, split=split, streaming=streaming)``. Rows without image bytes but with image URLs (``pickapic_v2_no_images``)
    have their images fetched once into ``image_cache_dir``; a failed fetch counts as a bad image.

    Errors name the file, row and field: a missing column, a label outside {0, 0.5, 1}. An undecodable
    image skips the row and counts it in ``stats`` (``strict=True``: an error naming the row).

    ``decode=False`` keeps each image as its checked file bytes (:class:`EncodedImage`, decoded when
    used): training reads data this way so that a large set does not sit in memory as pixels.
    """
    stats = stats if stats is not None else DataStats()
    cache = Path(image_cache_dir) if image_cache_dir else None
    files = resolve_sources(source, split)
    if files is None:
        yield from _rows_to_pairs(_hub_rows(str(source), split, streaming), drop_ties, strict, stats, cache, decode)
        return
    for f in files:
        rows = _tar_rows(f) if f.name.endswith(TAR_SUFFIXES) else _parquet_rows(f)
        yield from _rows_to_pairs(rows, drop_ties, strict, stats, cache, decode)


# ---- row sources: each yields (source description, row dict)

def _check_columns(names: Iterable[str], where: str) -> None:
    names = set(names)
    has_urls = {"image_0_url", "image_1_url"} <= names
    missing = [c for c in REQUIRED if c not in names and not (has_urls and c in ("jpg_0", "jpg_1"))]
    if missing:
        raise ValueError(f"{where}: missing column(s) {', '.join(repr(m) for m in missing)}; Pick-a-Pic data needs "
                         f"{', '.join(REQUIRED)} (or image_0_url/image_1_url instead of the jpg columns)")


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    _check_columns(names, str(path))
    wanted = [c for c in (*REQUIRED, *OPTIONAL) if c in names]
    i = 0
    for batch in pf.iter_batches(columns=wanted, batch_size=64):
        for row in batch.to_pylist():
            yield f"{path}:row {i}", row
            i += 1


def _tar_member_key(name: str) -> tuple[str, str]:
    """``("dir/KEY", "ext")`` for a member ``dir/KEY.ext`` (KEY ends at the first dot of the file name)."""
    head, _, base = name.rpartition("/")
    key, _, ext = base.partition(".")
    return (f"{head}/{key}" if head else key), ext


def _tar_field(ext: str) -> str | None:
    ext = ext.lower()
    if ext in ("jpg_0", "jpg_1", "json", "txt"):
        return ext
    idx, _, kind = ext.partition(".")
    if idx in ("0", "1") and kind in _IMAGE_EXTS:
        return f"jpg_{idx}"
    return None


def _tar_rows(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        tar = tarfile.open(path)
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{path}: not a readable tar file ({e})") from None
    seen: set[str] = set()
    current, sample, i = None, {}, 0
    with tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _tar_member_key(member.name)
            fld = _tar_field(ext)
            if fld is None:
                continue
            if key != current:
                if current is not None:
                    yield _tar_sample(path, i, current, sample)
                    i += 1
                if key in seen:
                    raise ValueError(f"{path}: members of sample {key!r} are not consecutive (WebDataset tars "
                                     "keep each sample's files together)")
                seen.add(key)
                current, sample = key, {}
            sample[fld] = tar.extractfile(member).read()
        if current is not None:
            yield _tar_sample(path, i, current, sample)


def _tar_sample(path: Path, i: int, key: str, files: dict) -> tuple[str, dict]:
    src = f"{path}:row {i} (key {key})"
    row: dict = {}
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except json.JSONDecodeError as e:
            raise ValueError(f"{src}: member {key}.json is not valid JSON ({e.msg})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"{src}: member {key}.json must hold a JSON object")
        row.update(meta)
    if "caption" not in row and "txt" in files:
        row["caption"] = files["txt"].decode("utf-8", errors="replace").strip()
    for fld in ("jpg_0", "jpg_1"):
        if fld in files:
            row[fld] = files[fld]
    for fld in ("label_0", "caption"):
        if fld not in row:
            raise ValueError(f"{src}: missing field {fld!r} (a sample needs {key}.json with caption and label_0)")
    return src, row


def import_datasets(what: str):
    """The HF ``datasets`` module; an ``ImportError`` saying that reading ``what`` needs it when it is absent
    (or shadowed by a local folder named datasets/)."""
    try:
        import datasets
    except ImportError:
        datasets = None
    if not hasattr(datasets, "load_dataset"):
        raise ImportError(f"reading {what} needs the `datasets` package (pip install datasets), or download its "
                          "parquet files and pass their paths")
    return datasets


def _hub_rows(dataset_id: str, split: str, streaming: bool) -> Iterator[tuple[str, dict]]:
    datasets = import_datasets(f"the hub dataset {dataset_id!r}")
    try:
        ds = datasets.load_dataset(dataset_id, split=split, streaming=streaming)
    except Exception as e:
        raise RuntimeError(f"could not open hub dataset {dataset_id!r} (split {split!r}): {e}. Offline, pass local "
                           "parquet files instead. yuvalkirstain/pickapic_v2 has been gone from the Hub since 2025: "
                           "use a mirror, or yuvalkirstain/pickapic_v2_no_images (images fetched from their URLs)"
                           ) from e
    where = f"{dataset_id}[{split}]"
    names = getattr(ds, "column_names", None)
    if names:
        _check_columns(names, where)
    for i, row in enumerate(ds):
        if i == 0 and not names:
            _check_columns(row.keys(), where)
        yield f"{where}:row {i}", row


# ---- images

def fetch_url(url: str, cache_dir: Path, timeout: float = 30.0) -> bytes:
    """The bytes at ``url``, downloaded once into ``cache_dir`` (file named by the URL's hash)."""
    import urllib.request

    path = cache_dir / (content_key(url) + ".img")
    if path.exists():
        return path.read_bytes()
    req = urllib.request.Request(url, headers={"User-Agent": "diffalign"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        data = r.read()
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return data


def _image_bytes(row: dict, i: int, cache_dir: Path | None) -> bytes | Image.Image:
    data = row.get(f"jpg_{i}")
    if isinstance(data, dict):  # a `datasets` Image feature left undecoded: {"bytes": ..., "path": ...}
        data = data.get("bytes")
    if data is None and row.get(f"image_{i}_url"):
        data = fetch_url(row[f"image_{i}_url"], cache_dir or default_image_cache_dir())
    if data is None:
        raise ValueError(f"field 'jpg_{i}': no image bytes and no image_{i}_url")
    return data


def _decode(data, where: str, decode: bool, check: bool = True) -> tuple[ImageLike, bytes]:
    """The image (RGB, or checked bytes if not ``decode``) and the bytes its cache key is made from."""
    if isinstance(data, Image.Image):  # a `datasets` Image feature, already decoded
        img = to_rgb(data)
        return img, f"{img.size}".encode() + img.tobytes()
    return (decode_image(data, where) if decode else EncodedImage.from_bytes(data, where, check)), bytes(data)


# ---- rows to pairs

def _label(value, src: str, fld: str) -> float:
    try:
        label = float(value)
    except (TypeError, ValueError):
        raise BadRow(f"{src}: field {fld!r} is {value!r}, not a number in {{0, 0.5, 1}}", "bad label") from None
    if label not in VALID_LABELS:
        raise BadRow(f"{src}: field {fld!r} is {value!r}; Pick-a-Pic labels are 0, 0.5 (tie) or 1", "bad label")
    return label


def pair_from_row(src: str, row: dict, *, drop_ties: bool = True, cache_dir: Path | None = None,
                  decode: bool = True, check: bool = True, stats: DataStats | None = None) -> PreferencePair:
    """One Pick-a-Pic row as a preference pair, winner first (``src`` names file and row).

    Raises :class:`~diffalign.data.pairs.SkipRow` for a row left out (a tie when ``drop_ties``, an
    empty caption, an undecodable or missing image) and :class:`~diffalign.data.pairs.BadRow` (a
    ``ValueError``) for a field that cannot be right. ``stats``, when given, counts the label.
    ``check=False`` reads only the images' headers (see :meth:`EncodedImage.from_bytes`)."""
    label = _label(row.get("label_0"), src, "label_0")
    if row.get("label_1") is not None and _label(row["label_1"], src, "label_1") != 1.0 - label:
        raise BadRow(f"{src}: field 'label_1' is {row['label_1']!r} but label_0 is {row['label_0']!r}; "
                     "they must sum to 1", "bad label")
    if stats is not None:
        stats.labels[label] += 1
    if label == 0.5 and drop_ties:
        raise SkipRow("tie", "a tie (label_0 = 0.5)", src)
    captions = [row.get("caption"), row.get("caption_1") or row.get("caption")]
    for fld, c in zip(("caption", "caption_1"), captions):
        if not isinstance(c, str):
            raise BadRow(f"{src}: field {fld!r} is {c!r}, not text", "bad caption")
    if not captions[0].strip():
        raise SkipRow("empty caption", "field 'caption' is empty", src)
    weight = row.get("weight")
    weight = 1.0 if weight is None else weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise BadRow(f"{src}: field 'weight' is {weight!r}; expected a finite number >= 0")
    scores = _scores(row, src)
    try:
        decoded = [_decode(_image_bytes(row, j, cache_dir), f"field 'jpg_{j}'", decode, check) for j in (0, 1)]
    except Exception as e:  # undecodable bytes, missing image, failed fetch
        kind = skip_reason(e) if isinstance(e, ImageTooLarge) or "undecodable" in str(e) else "missing image"
        raise SkipRow(kind, str(e), src) from None
    w = 0 if label >= 0.5 else 1  # ties kept (drop_ties=False) put image 0 first
    (img_w, raw_w), (img_l, raw_l) = decoded[w], decoded[1 - w]
    p_w, p_l = captions[w], captions[1 - w]
    return PreferencePair(prompt=p_w, chosen=img_w, rejected=img_l, prompt_rejected=p_l if p_l != p_w else None,
                          weight=float(weight), source=src, key=content_key(raw_w, raw_l, p_w, p_l),
                          scores=None if scores is None else (scores[w], scores[1 - w]),
                          user=None if row.get("user_id") is None else str(row["user_id"]))


def _rows_to_pairs(rows: Iterable[tuple[str, dict]], drop_ties: bool, strict: bool, stats: DataStats,
                   cache_dir: Path | None, decode: bool = True) -> Iterator[PreferencePair]:
    for src, row in rows:
        stats.rows += 1
        try:
            pair = pair_from_row(src, row, drop_ties=drop_ties, cache_dir=cache_dir, decode=decode, stats=stats)
        except SkipRow as skip:
            stats.skip_or_raise(skip, src, strict=strict)
            continue
        stats.kept += 1
        yield pair


def _scores(row: dict, src: str) -> tuple[float, float] | None:
    """``(score_0, score_1)`` when the row has both, None when it has neither."""
    values = [row.get("score_0"), row.get("score_1")]
    if values == [None, None]:
        return None
    for fld, v in zip(("score_0", "score_1"), values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise BadRow(f"{src}: field {fld!r} is {v!r}; expected a finite number (give both scores or neither)")
    return float(values[0]), float(values[1])


# ---- writing

def _row_value(row: dict, i: int, fld: str):
    if fld not in row or row[fld] is None:
        raise ValueError(f"row {i}: missing field {fld!r}")
    return row[fld]


def _columns(rows: list[dict], start: int, optional: list[str]) -> dict[str, pa.Array]:
    cols = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": [], **{o: [] for o in optional}}
    for i, r in enumerate(rows, start=start):
        label = _label(_row_value(r, i, "label_0"), f"row {i}", "label_0")
        caption = _row_value(r, i, "caption")
        if not isinstance(caption, str):
            raise ValueError(f"row {i}: field 'caption' is {caption!r}, not text")
        for fld in ("jpg_0", "jpg_1"):
            if not isinstance(_row_value(r, i, fld), (bytes, bytearray)):
                raise ValueError(f"row {i}: field {fld!r} must be image bytes")
            cols[fld].append(bytes(r[fld]))
        extra = [k for k in WRITABLE_OPTIONAL if r.get(k) is not None and k not in optional]
        if extra:
            raise ValueError(f"row {i}: field {extra[0]!r} appears only after the first rows; "
                             "give it (or None) in the first rows too")
        cols["caption"].append(caption)
        cols["label_0"].append(label)
        cols["label_1"].append(1.0 - label)
        for o in optional:
            value = r.get(o)
            cols[o].append(str(value) if o == "user_id" and value is not None else value)
    types = {"caption": pa.string(), "caption_1": pa.string(), "jpg_0": pa.binary(), "jpg_1": pa.binary(),
             "label_0": pa.float64(), "label_1": pa.float64(), "weight": pa.float64(), "score_0": pa.float64(),
             "score_1": pa.float64(), "user_id": pa.string()}
    return {k: pa.array(v, types[k]) for k, v in cols.items()}


def write_pickapic_parquet(rows: Iterable[dict], path: str | Path, *, batch_rows: int = 256,
                           optional_columns: Iterable[str] | None = None) -> Path:
    """Write rows (``caption``, ``jpg_0``/``jpg_1`` bytes, ``label_0``) as Pick-a-Pic parquet, atomically.

    ``label_1 = 1 - label_0`` is written too. ``caption_1``, ``weight``, ``score_0`` and ``score_1`` are written if named in
    ``optional_columns``, or (by default) when the first rows have them. Rows are streamed in batches
    into a temp file that is renamed over ``path`` only once complete: a failure (a bad row, a full
    disk) leaves no file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    writer = None
    try:
        optional = None if optional_columns is None else list(optional_columns)
        bad = [c for c in optional or () if c not in WRITABLE_OPTIONAL]
        if bad:
            raise ValueError(f"optional_columns may name {', '.join(WRITABLE_OPTIONAL)}, not {bad}")
        batch, start = [], 0
        for row in _with_end(rows):
            if row is not None:
                batch.append(row)
            if batch and (row is None or len(batch) >= batch_rows):
                if optional is None:
                    optional = [k for k in WRITABLE_OPTIONAL if any(r.get(k) is not None for r in batch)]
                table = pa.table(_columns(batch, start, optional))
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                start += len(batch)
                batch = []
        if writer is None:  # no rows: an empty file with the schema
            writer = pq.ParquetWriter(tmp, pa.table(_columns([], 0, optional or [])).schema)
        writer.close()
        writer = None
        os.replace(tmp, path)
    finally:
        if writer is not None:
            writer.close()
        if tmp.exists():
            tmp.unlink()
    return path


def _with_end(rows: Iterable[dict]) -> Iterator[dict | None]:
    yield from rows
    yield None
