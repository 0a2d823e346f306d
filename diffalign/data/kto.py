"""Per-image binary feedback for KTO: JSONL ``{"prompt", "image", "label"}`` or converted pairs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from diffalign.data.jsonl import image_skip, iter_jsonl_rows, read_image_file, require_text
from diffalign.data.pairs import BadRow, DataStats, ImageLike, PreferencePair, SkipRow, content_key

_TRUE = {"1", "+1", "true", "yes", "like", "liked", "desirable", "good", "win", "up", "thumbs_up"}
_FALSE = {"0", "-1", "false", "no", "dislike", "disliked", "undesirable", "bad", "lose", "down", "thumbs_down"}


@dataclass
class FeedbackSample:
    """One image with a thumbs-up (``desirable``) or thumbs-down for its prompt."""

    prompt: str
    image: ImageLike
    desirable: bool
    source: str = ""
    key: str = ""


def parse_label(value, where: str) -> bool:
    """true/false, 1/0 (or -1), "like"/"dislike" and the like; an error naming ``where`` otherwise."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (1, 0, -1):
        return value == 1
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{where}: field 'label' is {value!r}; use true/false, 1/0 or like/dislike")


def read_feedback(source: str | Path | Iterable[PreferencePair], *, image_root: str | Path | None = None,
                  strict: bool = False, stats: DataStats | None = None, decode: bool = True
                  ) -> Iterator[FeedbackSample]:
    """Feedback samples from a JSONL file (image paths relative to it or to ``image_root``), or from
    preference pairs (each gives its winner as desirable and its loser as undesirable). ``decode=False``
    keeps the images as checked file bytes (:class:`~diffalign.data.pairs.EncodedImage`)."""
    if not isinstance(source, (str, Path)):
        yield from feedback_from_pairs(source)
        return
    stats = stats if stats is not None else DataStats()
    for obj, src, root in iter_jsonl_rows(source, image_root, stats):
        try:
            sample = feedback_from_object(obj, src, root, decode, stats=stats)
        except SkipRow as skip:
            stats.skip_or_raise(skip, src, strict=strict)
            continue
        stats.kept += 1
        yield sample


def feedback_from_object(obj: dict, src: str, root: Path, decode: bool = True, check: bool = True,
                         stats: DataStats | None = None) -> FeedbackSample:
    """One JSONL object ``{"prompt", "image", "label"}`` as a feedback sample (``stats`` counts its label);
    :class:`~diffalign.data.pairs.BadRow` for a bad field, :class:`~diffalign.data.pairs.SkipRow` for an
    unreadable image."""
    try:
        prompt = require_text(obj, "prompt", src)
        name = require_text(obj, "image", src)
        if "label" not in obj:
            raise ValueError(f"{src}: missing field 'label'")
        desirable = parse_label(obj["label"], src)
    except ValueError as e:
        raise BadRow(str(e), "bad label" if "'label'" in str(e) else "bad field") from None
    if stats is not None:
        stats.labels["like" if desirable else "dislike"] += 1
    if not prompt.strip():
        raise SkipRow("empty caption", "field 'prompt' is empty", src)
    try:
        raw, image = read_image_file(root, name, "image", decode, check)
    except ValueError as e:
        raise image_skip(src, e) from None
    return FeedbackSample(prompt, image, desirable, src, content_key(raw, prompt))


def feedback_from_pairs(pairs: Iterable[PreferencePair]) -> Iterator[FeedbackSample]:
    """Each pair gives two samples: the winner desirable, the loser undesirable (with its own prompt)."""
    for p in pairs:
        yield FeedbackSample(p.prompt, p.chosen, True, p.source + " (chosen)", p.key + ":chosen")
        yield FeedbackSample(p.prompt_rejected or p.prompt, p.rejected, False, p.source + " (rejected)",
                             p.key + ":rejected")
