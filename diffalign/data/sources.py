"""Random access to the rows of a data set, without holding the set in memory.

Training reads its examples by index (:class:`Examples`), one micro-batch at a time, in the process
(or DataLoader worker) that needs them. Opening a source reads only what locates rows:

- **parquet** files, directories (in the Hub's layout, the files of one split) and globs: the row
  counts of each file's row groups, from its footer (:class:`ParquetRows`); a row group is read when
  a row in it is first asked for, and a few are kept;
- **WebDataset tars**: the member headers (:class:`TarRows`); an uncompressed tar is then read at the
  members' offsets, a compressed one (``.tar.gz``) whole, one shard kept at a time;
- **JSONL**: the byte offset of each line (:class:`JsonlRows`, 8 bytes a row);
- **HF datasets**: a ``datasets.Dataset`` object, a ``save_to_disk`` folder or a hub id, all
  memory-mapped Arrow (:class:`ArrowRows`; a hub id is downloaded to the HF cache once).

A source's ``blocks()`` are the sizes of the runs of rows that are cheap to read together (parquet
row groups, tar shards); :class:`~diffalign.core.positions.BlockOrder` shuffles within a window of
blocks so that a run reads each block once per epoch. Bad rows are met when read: the example makers
raise :class:`~diffalign.data.pairs.SkipRow` or :class:`~diffalign.data.pairs.BadRow`, and the
caller counts them (:class:`~diffalign.trainers.data.TrainingData`).
"""

from __future__ import annotations

import bisect
import json
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from diffalign.data.pairs import BadRow

ROW_GROUPS_KEPT = 8  # decoded parquet row groups kept per process (BlockOrder's window reads this many)


class RowSource:
    """``len(source)`` rows, ``source.row(i)`` → ``(where, row dict)``; ``where`` names file and row."""

    def __len__(self) -> int:
        raise NotImplementedError

    def row(self, i: int) -> tuple[str, dict]:
        raise NotImplementedError

    def blocks(self) -> list[int] | None:
        """Sizes of consecutive runs of rows best read together, or ``None`` if any order is cheap."""
        return None

    def column(self, name: str) -> list | None:
        """One small column of every row (e.g. RankDPO's ``ranking``), read without the images; ``None``
        when the source cannot read a column alone."""
        return None


class _PerProcess:
    """Open files and decoded blocks are kept per process: a DataLoader worker (a fork) starts afresh."""

    def _fresh(self) -> None:
        raise NotImplementedError

    def _check_process(self) -> None:
        if getattr(self, "_pid", None) != os.getpid():
            self._pid = os.getpid()
            self._fresh()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_pid"] = None
        for k in [k for k in state if k.startswith("_cache")]:
            state[k] = None
        return state


class ParquetRows(RowSource, _PerProcess):
    """The rows of parquet files, located from their footers' row-group counts.

    ``check_columns(names, where)`` is called with each file's column names (from its footer) and
    raises for a file lacking a needed column; ``columns`` picks the columns read (all if ``None``)."""

    def __init__(self, files: Sequence[str | Path], *, check_columns: Callable[[list[str], str], None] | None = None,
                 columns: Callable[[list[str]], list[str]] | None = None):
        self.files = [Path(f) for f in files]
        self._groups: list[tuple[int, int]] = []  # (file index, row group)
        sizes, file_starts, self._columns = [], [], []
        total = 0
        for fi, f in enumerate(self.files):
            try:
                meta = pq.read_metadata(f)
            except Exception as e:
                raise ValueError(f"{f}: not a readable parquet file ({e})") from None
            names = meta.schema.to_arrow_schema().names
            if check_columns is not None:
                check_columns(names, str(f))
            self._columns.append(columns(names) if columns else None)
            file_starts.append(total)
            for rg in range(meta.num_row_groups):
                n = meta.row_group(rg).num_rows
                if n:
                    self._groups.append((fi, rg))
                    sizes.append(n)
                    total += n
        self._sizes = sizes
        self._starts = np.cumsum([0] + sizes[:-1], dtype=np.int64) if sizes else np.zeros(0, np.int64)
        self._file_starts = file_starts
        self._n = total
        self._fresh()

    def _fresh(self) -> None:
        self._cache_groups: OrderedDict[int, list[dict]] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self._n

    def blocks(self) -> list[int]:
        return list(self._sizes)

    def _group(self, g: int):
        self._check_process()
        if self._cache_groups is None:
            self._fresh()
        if g in self._cache_groups:
            self._cache_groups.move_to_end(g)
            return self._cache_groups[g]
        fi, rg = self._groups[g]
        try:
            table = pq.ParquetFile(self.files[fi]).read_row_group(rg, columns=self._columns[fi])
        except Exception as e:
            raise ValueError(f"{self.files[fi]}: row group {rg} is unreadable ({e})") from None
        self._cache_groups[g] = table
        while len(self._cache_groups) > ROW_GROUPS_KEPT:
            self._cache_groups.popitem(last=False)
        return table

    def row(self, i: int) -> tuple[str, dict]:
        if not 0 <= i < self._n:
            raise IndexError(i)
        g = int(np.searchsorted(self._starts, i, side="right")) - 1
        fi, _ = self._groups[g]
        row = self._group(g).slice(i - int(self._starts[g]), 1).to_pylist()[0]
        return f"{self.files[fi]}:row {i - self._file_starts[fi]}", row

    def column(self, name: str) -> list | None:
        out = []
        for f in self.files:
            out += pq.read_table(f, columns=[name]).column(name).to_pylist()
        return out


class TarRows(RowSource, _PerProcess):
    """The samples of WebDataset tars (one sample: consecutive members sharing a key), located by a
    scan of the member headers. ``make_row(path, i, key, {field: bytes})`` turns a sample's members
    into ``(where, row)``; ``field_of(ext)`` names the field a member extension holds (``None``: ignored)."""

    def __init__(self, files: Sequence[str | Path], *, field_of: Callable[[str], str | None],
                 make_row: Callable[[Path, int, str, dict], tuple[str, dict]]):
        self.files = [Path(f) for f in files]
        self.field_of, self.make_row = field_of, make_row
        self._index: list[tuple[int, str, dict[str, tuple[int, int]]]] = []  # (file, key, {field: (offset, size)})
        self._shard_sizes: list[int] = []
        self._file_starts: list[int] = []
        for fi, f in enumerate(self.files):
            before = len(self._index)
            self._file_starts.append(before)
            self._scan(fi, f)
            self._shard_sizes.append(len(self._index) - before)
        self._shard_sizes = [n for n in self._shard_sizes if n]
        self._fresh()

    def _scan(self, fi: int, path: Path) -> None:
        try:
            tar = tarfile.open(path)
        except (tarfile.TarError, OSError) as e:
            raise ValueError(f"{path}: not a readable tar file ({e})") from None
        seen: set[str] = set()
        current, fields = None, {}
        with tar:
            for member in tar:
                if not member.isfile():
                    continue
                head, _, base = member.name.rpartition("/")
                key, _, ext = base.partition(".")
                key = f"{head}/{key}" if head else key
                fld = self.field_of(ext)
                if fld is None:
                    continue
                if key != current:
                    if current is not None:
                        self._index.append((fi, current, fields))
                    if key in seen:
                        raise ValueError(f"{path}: members of sample {key!r} are not consecutive (WebDataset tars "
                                         "keep each sample's files together)")
                    seen.add(key)
                    current, fields = key, {}
                fields[fld] = (member.offset_data, member.size)
            if current is not None:
                self._index.append((fi, current, fields))

    def _fresh(self) -> None:
        self._cache_shard: tuple[int, dict] | None = None  # a compressed shard read whole: (file, {offset: bytes})
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._index)

    def blocks(self) -> list[int]:
        return list(self._shard_sizes)

    def _members(self, fi: int, fields: dict[str, tuple[int, int]]) -> dict[str, bytes]:
        path = self.files[fi]
        if not path.name.endswith((".gz", ".tgz", ".bz2", ".xz")):
            out = {}
            with open(path, "rb") as f:
                for fld, (offset, size) in fields.items():
                    f.seek(offset)
                    out[fld] = f.read(size)
            return out
        self._check_process()
        if self._cache_shard is None or self._cache_shard[0] != fi:
            with tarfile.open(path) as tar:
                data = {m.offset_data: tar.extractfile(m).read() for m in tar if m.isfile()}
            self._cache_shard = (fi, data)
        return {fld: self._cache_shard[1][offset] for fld, (offset, _) in fields.items()}

    def row(self, i: int) -> tuple[str, dict]:
        fi, key, fields = self._index[i]
        return self.make_row(self.files[fi], i - self._file_starts[fi], key, self._members(fi, fields))


class JsonlRows(RowSource, _PerProcess):
    """The non-empty lines of JSONL files, located by a scan for line starts (no JSON is parsed until a
    row is read). ``root_of(path)`` is the folder relative image paths of a file resolve against."""

    def __init__(self, files: Sequence[str | Path]):
        self.files = [Path(f) for f in files]
        offsets, lines, owners = [], [], []
        for fi, path in enumerate(self.files):
            if not path.is_file():
                raise FileNotFoundError(f"no such JSONL file: {path}")
            with open(path, "rb") as f:
                pos, n = 0, 0
                for line in f:
                    n += 1
                    if line.strip():
                        offsets.append(pos)
                        lines.append(n)
                        owners.append(fi)
                    pos += len(line)
        self._offsets = np.asarray(offsets, dtype=np.int64)
        self._lines = np.asarray(lines, dtype=np.int64)
        self._owners = np.asarray(owners, dtype=np.int32)
        self._fresh()

    def _fresh(self) -> None:
        self._cache_handles: dict[int, object] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self._offsets)

    def row(self, i: int) -> tuple[str, dict]:
        self._check_process()
        if self._cache_handles is None:
            self._fresh()
        fi = int(self._owners[i])
        f = self._cache_handles.get(fi)
        if f is None:
            f = self._cache_handles[fi] = open(self.files[fi], "rb")
        f.seek(int(self._offsets[i]))
        where = f"{self.files[fi]}:line {int(self._lines[i])}"
        try:
            obj = json.loads(f.readline())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRow(f"{where}: not valid JSON ({getattr(e, 'msg', e)})", "malformed row") from None
        if not isinstance(obj, dict):
            raise BadRow(f"{where}: expected a JSON object", "malformed row")
        return where, obj

    def root(self, i: int) -> Path:
        """The folder of the file row ``i`` is in (relative image paths resolve against it)."""
        return self.files[int(self._owners[i])].parent

    def column(self, name: str) -> list | None:
        return [self.row(i)[1].get(name) for i in range(len(self))]


class ArrowRows(RowSource):
    """The rows of a (memory-mapped) ``datasets.Dataset``; ``where`` is ``name:row i``."""

    def __init__(self, dataset, name: str):
        self.dataset, self.name = dataset, name

    def __len__(self) -> int:
        return len(self.dataset)

    def row(self, i: int) -> tuple[str, dict]:
        return f"{self.name}:row {i}", self.dataset[int(i)]

    def column(self, name: str) -> list | None:
        return list(self.dataset[name])


class SubsetRows(RowSource):
    """The rows ``indices`` (ascending) of another source, e.g. all but its ties; blocks follow the source's."""

    def __init__(self, source: RowSource, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def row(self, i: int) -> tuple[str, dict]:
        return self.source.row(int(self.indices[i]))

    def blocks(self) -> list[int] | None:
        sizes = self.source.blocks()
        if sizes is None:
            return None
        edges = np.cumsum([0] + list(sizes))
        counts = np.diff(np.searchsorted(self.indices, edges))
        return [int(c) for c in counts if c > 0]

    def column(self, name: str) -> list | None:
        col = self.source.column(name)
        return None if col is None else [col[i] for i in self.indices]

    def root(self, i: int):
        return self.source.root(int(self.indices[i]))


class ConcatRows(RowSource):
    """Several sources one after the other (e.g. parquet files and tars in one ``data.source`` list)."""

    def __init__(self, sources: Sequence[RowSource]):
        self.sources = [s for s in sources if len(s)]
        self._starts = np.cumsum([0] + [len(s) for s in self.sources], dtype=np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, i: int) -> tuple[RowSource, int]:
        k = bisect.bisect_right(self._starts.tolist(), i) - 1
        return self.sources[k], i - int(self._starts[k])

    def row(self, i: int) -> tuple[str, dict]:
        src, j = self._locate(i)
        return src.row(j)

    def blocks(self) -> list[int] | None:
        out = []
        for s in self.sources:
            b = s.blocks()
            out += b if b is not None else [len(s)]
        return out

    def column(self, name: str) -> list | None:
        out = []
        for s in self.sources:
            col = s.column(name)
            if col is None:
                return None
            out += col
        return out


def open_hf_dataset(spec, split: str | None, where: str):
    """A ``datasets.Dataset`` from a ``Dataset``/``DatasetDict`` object, a ``save_to_disk`` folder or a hub
    id (downloaded to the HF cache once, then memory-mapped); ``None`` if ``spec`` is none of these."""
    is_folder = isinstance(spec, (str, Path)) and os.path.isdir(spec) and any(
        (Path(spec) / name).is_file() for name in ("state.json", "dataset_dict.json"))
    if not (is_folder or hasattr(spec, "column_names") or (isinstance(spec, str) and _is_hub_id(spec))):
        return None
    from diffalign.data.pickapic import import_datasets

    datasets = import_datasets(where)
    if hasattr(spec, "column_names"):
        ds = spec
    elif is_folder:
        ds = datasets.load_from_disk(str(spec))
    else:
        try:
            ds = datasets.load_dataset(spec, split=split)
        except Exception as e:
            raise RuntimeError(f"could not open hub dataset {spec!r} (split {split!r}): {e}. Offline, pass local "
                               "parquet files or a save_to_disk folder instead") from e
    if isinstance(ds, dict) or type(ds).__name__ == "DatasetDict":
        if split not in ds:
            raise ValueError(f"{where}: no split {split!r}; it has {sorted(ds)}")
        ds = ds[split]
    if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
        raise ValueError(f"{where}: a streaming (iterable) dataset has no random access; training reads a "
                         "map-style Dataset (load_dataset without streaming=True memory-maps it)")
    return ds


def _is_hub_id(s: str) -> bool:
    from diffalign.data.pickapic import _looks_like_hub_id

    return not os.path.exists(s) and _looks_like_hub_id(s)


__all__ = ["ArrowRows", "ConcatRows", "JsonlRows", "ParquetRows", "RowSource", "SubsetRows", "TarRows",
           "open_hf_dataset"]
