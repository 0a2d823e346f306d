"""Preference examples as the trainers see them, and the counts every reader keeps."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field

from PIL import Image


@dataclass
class PreferencePair:
    """One preference pair, winner first.

    ``source`` says where it came from (``file.parquet:row 12``) for error messages; ``key`` is a
    content hash of the two images and the prompt, used to cache latents.
    """

    prompt: str
    chosen: Image.Image
    rejected: Image.Image
    prompt_rejected: str | None = None
    weight: float = 1.0
    source: str = ""
    key: str = ""


@dataclass
class DataStats:
    """What a reader saw: rows read, pairs kept, ties dropped, bad images skipped."""

    rows: int = 0
    kept: int = 0
    ties_dropped: int = 0
    bad_images: int = 0
    bad_rows: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f"{self.rows} rows read, {self.kept} kept, {self.ties_dropped} ties dropped, "
                f"{self.bad_images} undecodable images skipped")


def content_key(*parts: bytes | str) -> str:
    """A short hex digest of byte/str parts (the cache key of an example)."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        b = p.encode() if isinstance(p, str) else p
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode image bytes to RGB; a ``ValueError`` naming ``where`` if they are not an image."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except Exception as e:  # PIL raises several types for bad data
        raise ValueError(f"{where}: undecodable image ({type(e).__name__}: {e})") from None
