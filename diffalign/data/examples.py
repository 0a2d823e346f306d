"""A recipe's data section as random-access training examples (:func:`open_examples`).

``examples.get(i)`` reads row ``i`` of the source (:mod:`diffalign.data.sources`) and makes the
example the method trains on: a :class:`~diffalign.data.pairs.PreferencePair` (``pairs``,
``chosen``, ``feedback-pairs``), a :class:`~diffalign.data.kto.FeedbackSample` (``feedback``; from
preference pairs each row gives two, winner then loser) or a ranked list (``ranked``). Images stay
file bytes whose header alone has been read (:class:`~diffalign.data.pairs.EncodedImage`); they are
decoded when a step needs their pixels. A row that is left out raises
:class:`~diffalign.data.pairs.SkipRow`, one with a field that cannot be right
:class:`~diffalign.data.pairs.BadRow`: the caller counts them (or stops, under ``data.strict``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from diffalign.data.pairs import BadRow, EncodedImage, SkipRow, content_key, skip_reason
from diffalign.data.sources import (
    ArrowRows,
    ConcatRows,
    JsonlRows,
    ParquetRows,
    RowSource,
    SubsetRows,
    TarRows,
    open_hf_dataset,
)

FORMATS = ("pickapic", "jsonl", "feedback", "ranked")


@dataclass
class Examples:
    """``len(examples)`` examples; ``get(i)`` makes example ``i`` from its row (``row_of(i)``).

    ``make(row index, where, row)`` builds one row's example (or, with ``per_row`` > 1, a tuple of
    ``per_row`` examples); ``limit`` keeps only the first rows (``data.max_samples``)."""

    rows: RowSource
    make: Callable[[int, str, dict], object]
    per_row: int = 1
    limit: int | None = None
    ties_dropped: int = 0  # ties left out when opening (found from the label column alone)

    def num_rows(self) -> int:
        return len(self.rows) if self.limit is None else min(len(self.rows), self.limit)

    def __len__(self) -> int:
        return self.num_rows() * self.per_row

    def row_of(self, i: int) -> int:
        """The index of the row example ``i`` comes from."""
        return i // self.per_row

    def blocks(self) -> list[int] | None:
        """Sizes of the runs of examples cheap to read together (see :meth:`RowSource.blocks`)."""
        sizes = self.rows.blocks()
        if sizes is None:
            return None
        out, left = [], self.num_rows()
        for n in sizes:
            if left <= 0:
                break
            out.append(min(n, left) * self.per_row)
            left -= n
        return out

    def get(self, i: int):
        """Example ``i``; raises :class:`SkipRow` / :class:`BadRow` for a row that is left out."""
        r, part = divmod(i, self.per_row)
        where, row = self.rows.row(r)
        made = self.make(r, where, row)
        return made if self.per_row == 1 else made[part]


def open_examples(data, kind: str) -> tuple[Examples, str]:
    """The examples of a recipe's data section (``data``: a :class:`~diffalign.trainers.config.DataConfig`)
    for a method's ``kind``, and the kind the batches take (``feedback-pairs`` on per-image feedback
    becomes ``feedback``). Opening reads only what locates rows; a missing column is an error here."""
    if data.format not in FORMATS:
        raise ValueError(f"unknown data.format {data.format!r}; choose {', '.join(FORMATS)}")
    if (kind == "ranked") != (data.format == "ranked"):
        raise ValueError(f"data.format {data.format!r} does not fit this method: ranked-list methods (RankDPO) take "
                         "data.format: ranked (from 'diffalign data label --format ranked'), the others do not")
    if data.format == "pickapic":
        from diffalign.data.pickapic import pair_from_row

        rows = pickapic_rows(data.source, data.split)
        make = lambda r, where, row: pair_from_row(where, row, drop_ties=data.drop_ties, decode=False,  # noqa: E731
                                                   check=False)
    elif data.format == "jsonl":
        from diffalign.data.jsonl import raw_pair_from_object

        rows = JsonlRows(_paths(data.source))
        make = lambda r, where, obj: raw_pair_from_object(obj, where, rows.root(r), decode=False,  # noqa: E731
                                                          check=False).as_pair()
    elif data.format == "feedback":
        from diffalign.data.kto import feedback_from_object

        rows = JsonlRows(_paths(data.source))
        make = lambda r, where, obj: feedback_from_object(obj, where, rows.root(r), decode=False,  # noqa: E731
                                                          check=False)
    else:
        rows = ranked_rows(data.source)
        make = lambda r, where, row: ranked_from_row(where, row, _root(rows, r))  # noqa: E731
    if kind == "feedback-pairs" and data.format == "feedback":
        kind = "feedback"  # per-image feedback has no pairs to keep together
    ties = 0
    if data.format == "pickapic" and data.drop_ties:
        rows, ties = _without_ties(rows)
    examples = Examples(rows, make, limit=data.max_samples)
    examples.ties_dropped = ties
    if kind == "feedback" and data.format != "feedback":
        from diffalign.data.kto import FeedbackSample

        def both(r: int, where: str, row: dict) -> tuple:
            p = make(r, where, row)
            return (FeedbackSample(p.prompt, p.chosen, True, p.source + " (chosen)", p.key + ":chosen"),
                    FeedbackSample(p.prompt_rejected or p.prompt, p.rejected, False, p.source + " (rejected)",
                                   p.key + ":rejected"))

        examples = Examples(rows, both, per_row=2, limit=data.max_samples)
        examples.ties_dropped = ties
    if not len(examples):
        raise ValueError(f"no rows in {data.source}")
    return examples, kind


def _without_ties(rows: RowSource) -> tuple[RowSource, int]:
    """The rows but the ties (``label_0 == 0.5``), found from the ``label_0`` column alone (no image is read),
    as the official Diffusion-DPO code filters them before training; and how many there were. A source
    that cannot read a column alone keeps its ties, met (and skipped) when read."""
    import numpy as np

    labels = rows.column("label_0")
    if labels is None:
        return rows, 0
    values = np.array([np.nan if v is None else _as_float(v) for v in labels], dtype=np.float64)
    keep = np.flatnonzero(values != 0.5)
    if len(keep) == len(values):
        return rows, 0
    return SubsetRows(rows, keep), int(len(values) - len(keep))


def _as_float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")  # a bad label: kept, and met (a counted skip) when read


def _paths(source) -> list[Path]:
    return [Path(s) for s in (source if isinstance(source, (list, tuple)) else [source])]


def _root(rows: RowSource, r: int) -> Path | None:
    return rows.root(r) if isinstance(rows, JsonlRows) else None


def pickapic_rows(source, split: str | None) -> RowSource:
    """The rows of Pick-a-Pic-schema data: parquet files/dirs/globs and WebDataset tars (see
    :func:`diffalign.data.pickapic.resolve_sources`), a ``datasets.Dataset``, a ``save_to_disk`` folder
    or a hub id."""
    from diffalign.data.pickapic import (
        OPTIONAL,
        REQUIRED,
        TAR_SUFFIXES,
        _check_columns,
        _tar_field,
        _tar_sample,
        resolve_sources,
    )

    ds = open_hf_dataset(source, split, str(source))
    if ds is not None:
        where = str(source) if isinstance(source, (str, Path)) else "dataset"
        if isinstance(source, str) and not os.path.isdir(source):
            where = f"{source}[{split}]"  # a hub id
        _check_columns(ds.column_names, where)
        return ArrowRows(ds, where)
    files = resolve_sources(source, split)
    parquet = [f for f in files if not f.name.endswith(TAR_SUFFIXES)]
    tars = [f for f in files if f.name.endswith(TAR_SUFFIXES)]
    parts: list[RowSource] = []
    if parquet:
        parts.append(ParquetRows(parquet, check_columns=_check_columns,
                                 columns=lambda names: [c for c in (*REQUIRED, *OPTIONAL) if c in names]))
    if tars:
        parts.append(TarRows(tars, field_of=_tar_field, make_row=_tar_sample))
    return parts[0] if len(parts) == 1 else ConcatRows(parts)


# ---- ranked lists (diffalign data label --output ranked)

def ranked_rows(source) -> RowSource:
    """The lists of ranked-list files (``.jsonl``: image paths; ``.parquet``: image bytes)."""
    parts: list[RowSource] = []
    for p in _paths(source):
        if p.suffix == ".jsonl":
            parts.append(JsonlRows([p]))
        else:
            parts.append(ParquetRows([p]))
    return parts[0] if len(parts) == 1 else ConcatRows(parts)


@dataclass
class RankedExample:
    """One prompt's images (file bytes, header read), their combined scores and ranking (best first)."""

    caption: str
    images: list[EncodedImage]
    names: list[str]
    scores: list[float]
    ranking: list[int]
    key: str = ""
    source: str = ""


def ranked_from_row(where: str, row: dict, root: Path | None) -> RankedExample:
    """One ranked list; a :class:`SkipRow` for a list of fewer than two images, a :class:`BadRow` for a
    ranking that is not a permutation of the images or a missing image file."""
    try:
        caption, names, scores, ranking = row["caption"], row["names"], row["scores"], row["ranking"]
        images = row["images"]
    except KeyError as e:
        raise BadRow(f"{where}: missing field {e.args[0]!r}") from None
    if len(ranking) < 2:
        raise SkipRow("fewer than two images", f"{len(ranking)} ranked image(s)", where)
    if sorted(ranking) != list(range(len(images))) or len(scores) != len(images):
        raise BadRow(f"{where}: 'ranking' must be a permutation of the images' indices and 'scores' hold one "
                     "score per image")
    raws = []
    for k, im in enumerate(images):
        if isinstance(im, (bytes, bytearray)):
            raws.append(bytes(im))
            continue
        f = Path(im) if os.path.isabs(im) else (root or Path(".")) / im
        try:
            raws.append(f.read_bytes())
        except OSError:
            raise BadRow(f"{where}: image {im!r} not found (paths are relative to {root})", "missing image") from None
    try:
        encoded = [EncodedImage.from_bytes(b, f"{where}: image {k}", check=False) for k, b in enumerate(raws)]
    except ValueError as e:
        raise SkipRow(skip_reason(e), str(e), where) from None
    key = content_key(caption, *names, *raws)
    return RankedExample(caption, encoded, list(names), [float(s) for s in scores], list(ranking), key, where)


def ranked_list_size(rows: RowSource) -> int:
    """The shortest list's length (of lists of two or more): RankDPO cuts every list to it. Reads only the
    ``ranking`` field."""
    col = rows.column("ranking")
    sizes = [len(r) for r in col if r is not None and len(r) >= 2] if col is not None else []
    if not sizes:
        raise ValueError("no ranked list has two or more images")
    return min(sizes)


__all__ = ["Examples", "RankedExample", "open_examples", "pickapic_rows", "ranked_from_row", "ranked_list_size"]
