"""Generic preference pairs from JSONL: one ``{"prompt", "chosen", "rejected"}`` object per line.

Image paths are relative to the JSONL file (or ``image_root``); absolute paths are used as they are.
Optional fields: ``prompt_rejected`` (a different caption for the loser, DCPO), ``weight``
(per-pair loss weight, a finite number >= 0) and ``score_chosen`` / ``score_rejected`` (reward scores
of the two images, both or neither; SmPO).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
)


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-empty line; a clear error for malformed JSON."""
    with open(path, encoding="utf-8") as f:
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


def require_text(obj: dict, fld: str, src: str, optional: bool = False) -> str | None:
    """``obj[fld]`` if it is a string; an error naming ``src`` and the field otherwise."""
    if fld not in obj or (optional and obj[fld] is None):
        if optional:
            return None
        raise ValueError(f"{src}: missing field {fld!r}")
    if not isinstance(obj[fld], str):
        raise ValueError(f"{src}: field {fld!r} is {obj[fld]!r}, not text")
    return obj[fld]


def iter_jsonl_rows(path: str | Path, image_root: str | Path | None, stats: DataStats
                    ) -> Iterator[tuple[dict, str, Path]]:
    """``(object, "file:line n", image folder)`` for each row of a JSONL data file, counted in
    ``stats.rows``; image paths resolve against ``image_root`` or else the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    root = Path(image_root) if image_root else path.parent
    for n, obj in iter_jsonl(path):
        stats.rows += 1
        yield obj, f"{path}:line {n}", root


def read_image_file(root: Path, name: str, fld: str, decode: bool = True, check: bool = True
                    ) -> tuple[bytes, ImageLike]:
    """The bytes and image of ``root / name`` (decoded, or kept as an :class:`EncodedImage`, checked
    unless ``check=False``, if not ``decode``); a ``ValueError`` naming ``fld`` if it is unreadable."""
    try:
        raw = (root / name).read_bytes()
    except OSError as e:
        raise ValueError(f"field {fld!r}: cannot read {root / name} ({e.strerror or e})") from None
    where = f"field {fld!r}"
    return raw, decode_image(raw, where) if decode else EncodedImage.from_bytes(raw, where, check)


def image_skip(src: str, error: ValueError) -> SkipRow:
    """The skip for an image that could not be read (``missing image``), decoded (``undecodable image``) or
    is past ``pairs.MAX_IMAGE_PIXELS`` (``image too large``)."""
    kind = skip_reason(error) if isinstance(error, ImageTooLarge) or "undecodable" in str(error) else "missing image"
    return SkipRow(kind, str(error), src)


@dataclass
class RawPair:
    """A validated JSONL pair with its image bytes (before decoding into a ``PreferencePair``)."""

    prompt: str
    chosen: bytes
    rejected: bytes
    prompt_rejected: str | None
    weight: float
    source: str
    images: tuple[ImageLike, ImageLike]
    scores: tuple[float, float] | None = None

    def as_pair(self) -> PreferencePair:
        return PreferencePair(prompt=self.prompt, chosen=self.images[0], rejected=self.images[1],
                              prompt_rejected=self.prompt_rejected, weight=self.weight, source=self.source,
                              scores=self.scores, key=content_key(self.chosen, self.rejected, self.prompt,
                                                                  self.prompt_rejected or self.prompt))


def raw_pair_from_object(obj: dict, src: str, root: Path, decode: bool = True, check: bool = True) -> RawPair:
    """One JSONL object as a validated pair; :class:`~diffalign.data.pairs.BadRow` for a field that cannot
    be right, :class:`~diffalign.data.pairs.SkipRow` for an unreadable image."""
    try:
        prompt = require_text(obj, "prompt", src)
        files = [require_text(obj, f, src) for f in ("chosen", "rejected")]
        prompt_rejected = require_text(obj, "prompt_rejected", src, optional=True)
    except ValueError as e:
        raise BadRow(str(e)) from None
    if not prompt.strip():
        raise SkipRow("empty caption", "field 'prompt' is empty", src)
    weight = obj.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise BadRow(f"{src}: field 'weight' is {weight!r}; expected a finite number >= 0")
    scores = None
    if obj.get("score_chosen") is not None or obj.get("score_rejected") is not None:
        for fld in ("score_chosen", "score_rejected"):
            v = obj.get(fld)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise BadRow(f"{src}: field {fld!r} is {v!r}; expected a finite number (give both scores "
                             "or neither)")
        scores = (float(obj["score_chosen"]), float(obj["score_rejected"]))
    try:
        (raw_w, image_w), (raw_l, image_l) = (read_image_file(root, name, fld, decode, check)
                                              for fld, name in zip(("chosen", "rejected"), files))
    except ValueError as e:
        raise image_skip(src, e) from None
    return RawPair(prompt, raw_w, raw_l, prompt_rejected, float(weight), src, (image_w, image_l), scores)


def iter_raw_pairs(path: str | Path, *, image_root: str | Path | None = None, strict: bool = False,
                   stats: DataStats | None = None, decode: bool = True) -> Iterator[RawPair]:
    """Validated pairs with their image bytes; rows with unreadable images are skipped and counted."""
    stats = stats if stats is not None else DataStats()
    for obj, src, root in iter_jsonl_rows(path, image_root, stats):
        try:
            raw = raw_pair_from_object(obj, src, root, decode)
        except SkipRow as skip:
            stats.skip_or_raise(skip, src, strict=strict)
            continue
        stats.labels[1.0] += 1
        stats.kept += 1
        yield raw


def read_jsonl_pairs(path: str | Path, *, image_root: str | Path | None = None, strict: bool = False,
                     stats: DataStats | None = None, decode: bool = True) -> Iterator[PreferencePair]:
    """Preference pairs from a JSONL file; errors name the file, line and field. ``decode=False`` keeps
    the images as checked file bytes (:class:`~diffalign.data.pairs.EncodedImage`)."""
    for r in iter_raw_pairs(path, image_root=image_root, strict=strict, stats=stats, decode=decode):
        yield r.as_pair()
