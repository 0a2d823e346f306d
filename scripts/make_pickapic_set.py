#!/usr/bin/env python
"""A Pick-a-Pic v2-format set of N pairs of distinct small JPEGs, for measuring the data path at scale.

    python scripts/make_pickapic_set.py --pairs 100000 --out /data/scale-100k

Writes ``OUT/train-00000-of-000NN.parquet`` ... (the Hub's layout), ``--shard-rows`` rows a file in row groups
of ``--row-group`` rows (Pick-a-Pic v2's own files hold about 1,300 rows), with ``caption``, ``jpg_0``,
``jpg_1``, ``label_0`` (1 or 0, and 0.5 for every ``--tie-every``-th row) and ``label_1``. Every image is
distinct: a smooth colour field plus a per-image pattern, ``--size`` pixels square (64: about 1.5 kB a
JPEG, so a million pairs is about 3 GB). Deterministic in ``--seed``; rows are made in parallel.
"""

from __future__ import annotations

import argparse
import io
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def image(seed: int, size: int) -> bytes:
    """A distinct ``size``² JPEG for ``seed``."""
    g = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = g.uniform(0, 255, 3)
    slope = g.uniform(-120, 120, (2, 3))
    pixels = base + x[..., None] * slope[0] + y[..., None] * slope[1]
    cx, cy, r = g.uniform(0.2, 0.8), g.uniform(0.2, 0.8), g.uniform(0.1, 0.3)
    pixels[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = g.uniform(0, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def write_shard(args: tuple) -> str:
    """Rows ``[start, stop)`` into one parquet file (atomically)."""
    path, start, stop, size, row_group, tie_every, seed = args
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64())])
    with pq.ParquetWriter(tmp, schema) as writer:
        for lo in range(start, stop, row_group):
            rows = range(lo, min(lo + row_group, stop))
            labels = [0.5 if tie_every and i % tie_every == tie_every - 1 else float(i % 2) for i in rows]
            writer.write_table(pa.table({
                "caption": [f"a photo of thing number {i}" for i in rows],
                "jpg_0": [image(2 * i + seed * 10**9, size) for i in rows],
                "jpg_1": [image(2 * i + 1 + seed * 10**9, size) for i in rows],
                "label_0": labels, "label_1": [1.0 - v for v in labels]}, schema=schema))
    os.replace(tmp, path)
    return str(path)


def make_set(out: str | Path, pairs: int, *, size: int = 64, shard_rows: int = 10_000, row_group: int = 1_000,
             tie_every: int = 10, seed: int = 0, workers: int | None = None) -> list[Path]:
    """Write the set (see the module docstring); returns its files. Files already complete are kept."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n = (pairs + shard_rows - 1) // shard_rows
    jobs = [(out / f"train-{k:05d}-of-{n:05d}.parquet", k * shard_rows, min((k + 1) * shard_rows, pairs), size,
             row_group, tie_every, seed) for k in range(n)]
    todo = [j for j in jobs if not j[0].exists()]
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        for done in pool.map(write_shard, todo):
            print(f"wrote {done}", flush=True)
    return [j[0] for j in jobs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--row-group", type=int, default=1_000)
    ap.add_argument("--tie-every", type=int, default=10, help="every N-th row a tie (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    a = ap.parse_args()
    files = make_set(a.out, a.pairs, size=a.size, shard_rows=a.shard_rows, row_group=a.row_group,
                     tie_every=a.tie_every, seed=a.seed, workers=a.workers)
    total = sum(f.stat().st_size for f in files)
    print(f"{a.pairs} pairs in {len(files)} files, {total / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
