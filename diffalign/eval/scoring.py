"""Score a generated folder (GenEval layout): rewards, the GenEval protocol, per-category summaries.

A folder is read back as a list of :class:`GeneratedImage` (prompt index, sample index, file,
prompt, category, metadata line). Scores are per image, ``{metric: [score per image]}``: one
metric per reward, plus ``geneval`` (1.0 when the GenEval protocol says the image is correct)
for prompts with GenEval metadata. Summaries and paired comparisons are computed from these.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from diffalign.data.generated import GeneratedImage

GENEVAL_METRIC = "geneval"


def _open(im: GeneratedImage) -> Image.Image:
    """The RGB image (transparency composited on white, as training does)."""
    from diffalign.data.pairs import to_rgb

    with Image.open(im.path) as f:
        f.load()
        return to_rgb(f) if f.mode != "RGB" else f.copy()


def drop_unreadable(images: Sequence[GeneratedImage]) -> tuple[list[GeneratedImage], list[tuple[GeneratedImage, str]]]:
    """``(images that decode, [(image, reason), ...] of those that do not)``: a folder given to score
    (``--images``) may hold a broken file; it is skipped and reported, not a crash after the others."""
    good, bad = [], []
    for im in images:
        try:
            _open(im)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            bad.append((im, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"))
        else:
            good.append(im)
    return good, bad


def score_images(images: Sequence[GeneratedImage], rewards: Mapping[str, object], *, batch_size: int = 16,
                 progress: str | None = "score") -> dict[str, list[float]]:
    """``{reward name: [score per image]}`` of every reward (``RewardModel.score``) on every image."""
    out: dict[str, list[float]] = {name: [] for name in rewards}
    if not rewards:
        return out
    with tqdm(total=len(images), desc=progress, unit="img", disable=progress is None) as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pil = [_open(im) for im in chunk]
            prompts = [im.prompt for im in chunk]
            for name, reward in rewards.items():
                values = reward.score(pil, prompts).detach().float().cpu().tolist()
                bad = [v for v in values if not math.isfinite(v)]
                if bad:
                    raise ValueError(f"reward {name!r} gave non-finite scores on {chunk[0].path.parent.parent}")
                out[name].extend(float(v) for v in values)
            bar.update(len(chunk))
    return out


def has_geneval_metadata(images: Sequence[GeneratedImage]) -> bool:
    """True when every image's metadata is a GenEval line (``tag`` and ``include``)."""
    return bool(images) and all("include" in im.metadata and "tag" in im.metadata for im in images)


def geneval_records(images: Sequence[GeneratedImage], detector, color_classifier=None, config=None, *,
                    root: str | Path | None = None, progress: str | None = "geneval") -> list[dict]:
    """GenEval's per-image records (:func:`diffalign.eval.geneval.evaluate_image`) of every image,
    with ``filename`` relative to ``root`` and the prompt and sample index added."""
    from diffalign.eval.geneval import evaluate_image

    records = []
    for im in tqdm(images, desc=progress, unit="img", disable=progress is None):
        name = str(im.path.relative_to(root)) if root is not None else str(im.path)
        rec = evaluate_image(_open(im), im.metadata, detector, color_classifier, config, filename=name)
        records.append({**rec, "prompt_index": im.prompt_index, "sample_index": im.sample_index})
    return records


def build_detector(spec: str, *, color_weights: str | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """``(detector, color_classifier)`` for a ``scoring.geneval_detector`` value other than
    ``auto``/``none``: ``shapes`` or ``transformers:<hub id or folder>`` (with GenEval's CLIP
    colour classifier, ``color_weights`` or the ``openai`` weights)."""
    from diffalign.eval.geneval import CLIPColorClassifier, TransformersDetector

    if spec == "shapes":
        from diffalign.shapes.geneval import ShapesDetector

        return ShapesDetector(), None
    if spec.startswith("transformers:"):
        detector = TransformersDetector.from_pretrained(spec.split(":", 1)[1], device=device)
        return detector, CLIPColorClassifier.from_pretrained(color_weights, device=device)
    raise ValueError(f"unknown GenEval detector {spec!r}; use auto, none, shapes or transformers:<hub id or folder>")


def _stats(values: Sequence[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    sd = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {"mean": float(a.mean()), "std": sd, "sem": sd / math.sqrt(len(a)) if len(a) else 0.0, "n": int(len(a))}


def summarize(images: Sequence[GeneratedImage], scores: Mapping[str, Sequence[float]],
              breakdowns: Sequence[str] = ("category",)) -> dict:
    """Means of each metric overall (``metrics``: mean, std, sem, n) and per group of each breakdown
    (``by[breakdown][group] = {"n": images, metric: mean}``); groups keep first-seen order."""
    for name, values in scores.items():
        if len(values) != len(images):
            raise ValueError(f"{len(values)} {name} scores for {len(images)} images")
    out = {"n_images": len(images), "n_prompts": len({im.prompt_index for im in images}),
           "metrics": {name: _stats(v) for name, v in scores.items()}, "by": {}}
    for b in breakdowns:
        groups: dict[str, list[int]] = {}
        for k, im in enumerate(images):
            g = im.group(b)
            if g is not None:
                groups.setdefault(g, []).append(k)
        if groups:
            out["by"][b] = {g: {"n": len(idx), **{name: float(np.mean([scores[name][k] for k in idx]))
                                                  for name in scores}} for g, idx in groups.items()}
    return out


def paired(images: Sequence[GeneratedImage], scores_a: Mapping[str, Sequence[float]],
           scores_b: Mapping[str, Sequence[float]], breakdowns: Sequence[str] = ("category",), *, n_boot: int = 2000,
           seed: int = 0) -> dict:
    """:func:`~diffalign.eval.compare.compare_rewards` of A against B (same images order: same prompt
    and seed), overall (``metrics``) and per group (``by``); bootstraps resample prompts."""
    from diffalign.eval.compare import compare_rewards

    groups = [im.prompt_index for im in images]
    out = {"metrics": compare_rewards(scores_a, scores_b, n_boot=n_boot, seed=seed, groups=groups), "by": {}}
    for b in breakdowns:
        members: dict[str, list[int]] = {}
        for k, im in enumerate(images):
            g = im.group(b)
            if g is not None:
                members.setdefault(g, []).append(k)
        if members:
            out["by"][b] = {
                g: compare_rewards({n: [scores_a[n][k] for k in idx] for n in scores_a},
                                   {n: [scores_b[n][k] for k in idx] for n in scores_b},
                                   n_boot=n_boot, seed=seed, groups=[groups[k] for k in idx])
                for g, idx in members.items()}
    return out
