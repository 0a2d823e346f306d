"""Per-image binary feedback for KTO: JSONL ``{"prompt", "image", "label"}`` or converted pairs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from diffalign.data.jsonl import iter_jsonl
from diffalign.data.pairs import DataStats, PreferencePair, content_key, decode_image

_TRUE = {True, 1, "1", "true", "like", "desirable", "good", "win"}
_FALSE = {False, 0, "0", "false", "dislike", "undesirable", "bad", "lose"}


@dataclass
class FeedbackSample:
    prompt: str
    image: Image.Image
    desirable: bool
    source: str = ""
    key: str = ""


def _label(value, where: str) -> bool:
    v = value.lower() if isinstance(value, str) else value
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{where}: field 'label' is {value!r}; use true/false, 1/0 or like/dislike")


def read_feedback(path: str | Path, *, image_root: str | Path | None = None, strict: bool = False,
                  stats: DataStats | None = None) -> Iterator[FeedbackSample]:
    """Feedback samples from a JSONL file (image paths relative to it or to ``image_root``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such JSONL file: {path}")
    root = Path(image_root) if image_root else path.parent
    stats = stats if stats is not None else DataStats()
    for n, obj in iter_jsonl(path):
        stats.rows += 1
        src = f"{path}:line {n}"
        for fld in ("prompt", "image", "label"):
            if fld not in obj:
                raise ValueError(f"{src}: missing field '{fld}' (feedback needs prompt, image, label)")
        desirable = _label(obj["label"], src)
        try:
            raw = (root / obj["image"]).read_bytes()
            image = decode_image(raw, f"{src} field 'image'")
        except (OSError, ValueError) as e:
            if strict:
                raise ValueError(f"{src}: {e}") from None
            stats.bad_images += 1
            stats.bad_rows.append(src)
            continue
        stats.kept += 1
        yield FeedbackSample(obj["prompt"], image, desirable, src, content_key(raw, obj["prompt"]))


def feedback_from_pairs(pairs: Iterable[PreferencePair]) -> Iterator[FeedbackSample]:
    """Each pair gives two samples: the winner desirable, the loser undesirable."""
    for p in pairs:
        yield FeedbackSample(p.prompt, p.chosen, True, p.source + " (chosen)", p.key + ":chosen")
        yield FeedbackSample(p.prompt_rejected or p.prompt, p.rejected, False, p.source + " (rejected)", p.key + ":rejected")
