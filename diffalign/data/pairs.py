"""Preference examples as the trainers see them, and the counts every reader keeps."""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from collections import Counter
from dataclasses import dataclass, field

from PIL import Image

MAX_BAD_ROWS_KEPT = 100  # DataStats keeps the first rows it skipped, for the report
MAX_IMAGE_PIXELS = 89_478_485  # the largest image read (width × height): PIL's decompression-bomb limit, ~9459²


class ImageTooLarge(ValueError):
    """An image of more than :data:`MAX_IMAGE_PIXELS` pixels, refused from its header before any decoding
    (instead of PIL's ``DecompressionBombWarning``/``Error``); training counts it as a skipped row,
    reason ``image too large``."""


def open_image(data: bytes, where: str) -> Image.Image:
    """``PIL.Image.open`` of ``data`` (the header only; nothing decoded yet), an :class:`ImageTooLarge`
    naming ``where`` for an image past :data:`MAX_IMAGE_PIXELS`."""
    try:
        with warnings.catch_warnings():  # PIL warns past its limit: diffalign's own check below says more
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # past twice PIL's limit: PIL refuses before giving the size
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(found.group(1)):,} pixels" if found else "its size"
        raise ImageTooLarge(_too_large(where, size)) from None
    width, height = img.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(_too_large(where, f"{width}×{height} = {width * height:,} pixels"))
    return img


def _too_large(where: str, size: str) -> str:
    return (f"{where}: image too large ({size}; diffalign reads images of at most {MAX_IMAGE_PIXELS:,} pixels, "
            "PIL's decompression-bomb limit): downscale it")


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as RGB, an image with transparency (RGBA, LA, P or L/RGB with a transparent colour)
    composited on white first: a transparent pixel trains and scores as white, not as whatever colour
    its RGB channels happen to hold (usually black)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True, eq=False)
class EncodedImage:
    """An image kept as its file bytes (JPEG, PNG, WebP ...) and decoded only when its pixels are needed.

    Training data holds its images this way, so a pair costs its compressed size in memory rather than
    its decoded pixels (a 512² JPEG: ~50 kB instead of 786 kB). ``width`` and ``height`` are the
    image's true size, known without decoding. Build it with :meth:`from_bytes`, which checks once
    that the bytes decode (and, from the header, that the image is not too large).
    """

    data: bytes
    width: int
    height: int

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)``, as ``PIL.Image.size``."""
        return self.width, self.height

    @classmethod
    def from_bytes(cls, data: bytes, where: str, check: bool = True) -> EncodedImage:
        """Check that ``data`` decodes (a ``ValueError`` naming ``where`` if not) and keep it undecoded.

        The check decodes the whole stream, so truncated files are caught here rather than mid-run;
        JPEGs are decoded at reduced scale for it (same check, about half the time). ``check=False``
        reads only the header (the size): training does this, meeting a bad stream when it decodes the
        image (a counted skip), and not at all when the image's latents are cached. Either way an image
        past :data:`MAX_IMAGE_PIXELS` is an :class:`ImageTooLarge` (a ``ValueError``), from its header."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"{where}: expected image bytes, got {type(data).__name__}")
        data = bytes(data)
        try:
            img = open_image(data, where)
            width, height = img.size
            if check:
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))  # a no-op for formats other than JPEG
                img.load()
        except ImageTooLarge:
            raise
        except Exception as e:  # PIL raises several types for bad data
            raise ValueError(f"{where}: undecodable image ({type(e).__name__}: {e})") from None
        return cls(data, width, height)

    def decode(self) -> Image.Image:
        """The RGB image."""
        return decode_image(self.data, "an EncodedImage")


ImageLike = Image.Image | EncodedImage


def skip_reason(error: ValueError) -> str:
    """The short reason a training row whose image raised ``error`` is skipped under: ``image too large``
    or ``undecodable image``."""
    return "image too large" if isinstance(error, ImageTooLarge) else "undecodable image"


def image_key(img: ImageLike) -> str:
    """A content key of one image: the hash of its file bytes (of its size and pixels for a decoded
    image). Cached latents are keyed by it and the placement, so an image shared by several rows,
    pairs or methods is encoded once."""
    if isinstance(img, EncodedImage):
        key = img.__dict__.get("_key")
        if key is None:
            key = content_key(img.data)
            object.__setattr__(img, "_key", key)
        return key
    return content_key(f"{img.size}", to_rgb(img).tobytes())


def as_pil(img: ImageLike) -> Image.Image:
    """``img`` as a PIL image (decoding an :class:`EncodedImage`)."""
    return img.decode() if isinstance(img, EncodedImage) else img


@dataclass
class PreferencePair:
    """One preference pair, winner first.

    ``source`` says where it came from (``file.parquet:row 12``) for error messages; ``key`` is a
    content hash of the two images and the prompt(s), used to cache latents: the same bytes in another
    row or file give the same key. ``scores``: reward scores ``(chosen, rejected)`` when the data has
    them (SmPO's smoothed preference reads them). ``user``: who labelled the pair, when the data says
    (Pick-a-Pic's ``user_id``, as text; PPD conditions on it). The images are PIL images, or
    :class:`EncodedImage` where a reader was asked not to decode (``decode=False``, as training does).
    """

    prompt: str
    chosen: ImageLike
    rejected: ImageLike
    prompt_rejected: str | None = None
    weight: float = 1.0
    source: str = ""
    key: str = ""
    scores: tuple[float, float] | None = None
    user: str | None = None


class SkipRow(Exception):
    """A row left out of training, not an error: ``reason`` is a short label (``tie``, ``undecodable image``,
    ``image too large``, ``missing image``, ``bad label``, ``empty caption``, ``bad field``, ``malformed row``), ``where`` names
    the file and row, ``detail`` says what was wrong."""

    def __init__(self, reason: str, detail: str = "", where: str = ""):
        super().__init__(f"{where}: {detail or reason}" if where else (detail or reason))
        self.reason, self.detail, self.where = reason, detail or reason, where


class BadRow(ValueError):
    """A row whose field cannot be right (a label outside {0, 0.5, 1}, a caption that is not text...): an
    error for the readers, a skip (reason ``reason``) for training unless ``data.strict``."""

    def __init__(self, message: str, reason: str = "bad field"):
        super().__init__(message)
        self.reason = reason


@dataclass
class DataStats:
    """What a reader saw: rows read, pairs kept, ties dropped, bad images skipped, label histogram.

    Pass one instance to several readers to count them together.
    """

    rows: int = 0
    kept: int = 0
    ties_dropped: int = 0
    bad_images: int = 0  # rows skipped as bad, for any reason of ``skipped`` (the name is historical)
    bad_rows: list[str] = field(default_factory=list)
    bad_reasons: list[str] = field(default_factory=list)  # why each row of bad_rows was skipped
    labels: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # reason ("undecodable image", "bad label"...) -> rows

    def skip_bad(self, source: str, reason: str = "", kind: str = "undecodable image") -> None:
        """Count a row skipped as bad (``source`` names file and row; ``kind`` is the short reason it is
        counted under; the first few rows are kept with their full ``reason``)."""
        self.bad_images += 1
        self.skipped[kind] += 1
        if len(self.bad_rows) < MAX_BAD_ROWS_KEPT:
            self.bad_rows.append(source)
            self.bad_reasons.append(reason)

    def skip_or_raise(self, skip: SkipRow, source: str, *, strict: bool) -> None:
        """Count the row ``skip`` leaves out: a tie as dropped; any other reason as a bad row
        (:meth:`skip_bad`), or under ``strict`` a ``ValueError`` naming the row and what was wrong."""
        if skip.reason == "tie":
            self.ties_dropped += 1
            return
        if strict:
            raise ValueError(str(skip)) from None
        self.skip_bad(source, skip.detail, skip.reason)

    def as_dict(self) -> dict:
        return {"rows": self.rows, "kept": self.kept, "ties_dropped": self.ties_dropped,
                "bad_images": self.bad_images, "skipped": dict(sorted(self.skipped.items())),
                "bad_rows": list(self.bad_rows), "bad_reasons": list(self.bad_reasons),
                "labels": {str(k): v for k, v in sorted(self.labels.items(), key=lambda kv: str(kv[0]))}}

    def __str__(self) -> str:
        why = ", ".join(f"{n} {k}" for k, n in sorted(self.skipped.items()))
        return (f"{self.rows} rows read, {self.kept} kept, {self.ties_dropped} ties dropped, "
                f"{self.bad_images} bad rows skipped" + (f" ({why})" if why else ""))


def content_key(*parts: bytes | str) -> str:
    """A short hex digest of byte/str parts (the cache key of an example); parts are length-prefixed."""
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        b = p.encode() if isinstance(p, str) else bytes(p)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def decode_image(data: bytes, where: str) -> Image.Image:
    """Decode image bytes to RGB; a ``ValueError`` naming ``where`` if they are not an image.

    An image with transparency (RGBA, LA, P with a transparent colour) is composited on white
    (:func:`to_rgb`). An image past :data:`MAX_IMAGE_PIXELS` (PIL's decompression-bomb limit) is an
    :class:`ImageTooLarge` naming ``where``, raised from its header before anything is decoded."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{where}: expected image bytes, got {type(data).__name__}")
    try:
        img = open_image(data, where)
        img.load()
        return to_rgb(img)
    except ImageTooLarge:
        raise
    except Exception as e:  # PIL raises several types for bad data
        raise ValueError(f"{where}: undecodable image ({type(e).__name__}: {e})") from None
