"""Generic preference pairs from JSONL: one ``{"prompt", "chosen", "rejected"}`` object per line.

Image paths are relative to the JSONL file (or ``image_root``). Optional fields: ``prompt_rejected``
(a different caption for the loser, DCPO) and ``weight`` (per-pair loss weight).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from diffalign.data.pairs import DataStats, PreferencePair, content_key, decode_image


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-empty line; a clear error for malformed JSON."""
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:line {n}: expected a JSON object")
            yield n, obj


def read_jsonl_pairs(path: str | Path, *, image_root: str | Path | None = None, strict: bool = False,
                     stats: DataStats | None = None) -> Iterator[PreferencePair]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    root = Path(image_root) if image_root else path.parent
    stats = stats if stats is not None else DataStats()
    for n, obj in iter_jsonl(path):
        stats.rows += 1
        src = f"{path}:line {n}"
        for fld in ("prompt", "chosen", "rejected"):
            if fld not in obj:
                raise ValueError(f"{src}: missing field '{fld}' (pairs need prompt, chosen, rejected)")
        try:
            raw = [(root / obj[f]).read_bytes() for f in ("chosen", "rejected")]
            chosen, rejected = (decode_image(b, f"{src} field '{f}'") for b, f in zip(raw, ("chosen", "rejected")))
        except (OSError, ValueError) as e:
            if strict:
                raise ValueError(f"{src}: {e}") from None
            stats.bad_images += 1
            stats.bad_rows.append(src)
            continue
        stats.kept += 1
        yield PreferencePair(prompt=obj["prompt"], chosen=chosen, rejected=rejected,
                             prompt_rejected=obj.get("prompt_rejected"), weight=float(obj.get("weight", 1.0)),
                             source=src, key=content_key(raw[0], raw[1], obj["prompt"], obj.get("prompt_rejected") or ""))
