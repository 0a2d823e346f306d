"""ShapesEval: read a generated image back and check each claim of its caption, scored like GenEval.

Detection is exact image analysis, no learned model:

1. the background is the median border colour; pixels more than ``FOREGROUND_DISTANCE`` from it
   are foreground;
2. foreground pixels within ``COLOR_DISTANCE`` of their nearest palette colour are colour cores;
   each connected core of one colour of at least ``MIN_AREA`` pixels is an object (specks are not);
3. an object's extent is where pixels lie at least half way from the background to its colour, and
   its coverage weights (that position, clipped to [0, 1]) give blur-robust moments that name the
   shape (:func:`shape_features`): triangles are skewed downwards, squares reach into their corners.

The rules then follow GenEval's ``evaluate_images.py`` (see :func:`evaluate`), with object area
standing in for detector confidence; :func:`shapes_eval` scores like GenEval's ``summary_scores.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from diffalign.shapes.grammar import TASKS, ShapesPrompt, parse_prompt
from diffalign.shapes.scene import COLORS

_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)  # [K, 3]
_NAMES = list(COLORS)
FOREGROUND_DISTANCE = 60.0   # RGB distance from the background that makes a pixel foreground
COLOR_DISTANCE = 80.0        # a pixel belongs to a colour only this close to it (edge blends do not)
MIN_AREA = 16                # colour cores smaller than this (pixels at 64 px; scaled with area) are specks
TRIANGLE_SKEW = -0.12        # vertical skewness below which an object is an (apex-up) triangle
SQUARE_CORNER = 0.12         # diagonal-minus-axis kurtosis above which an object is a square


@dataclass
class Detection:
    """An object found in an image: ``(cx, cy)`` the centroid of its pixels, ``area`` their count,
    ``bbox = (x0, y0, x1, y1)`` (end exclusive), all in pixels; ``fill`` = area / bbox area."""

    shape: str
    color: str
    cx: float
    cy: float
    area: int
    bbox: tuple[int, int, int, int]
    fill: float = 0.0


@dataclass
class EvalResult:
    """Verdict on one image: ``correct`` (every claim holds, GenEval's per-image score), each
    ``(claim, holds)`` and ``fraction``, the share of claims that hold."""

    correct: bool
    claims: list[tuple[str, bool]]
    fraction: float


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 3:  # [3, H, W] in [0, 1]
        arr = arr.transpose(1, 2, 0) * 255.0
    return arr


def shape_features(weights: np.ndarray) -> tuple[float, float]:
    """Blur-robust shape features of one object from its ``[H, W]`` coverage weights (0–1).

    Returns ``(skew, corner)``: ``skew`` is the skewness of the vertical mass distribution (an
    apex-up triangle: −0.57, circles and squares: 0); ``corner`` is the kurtosis along the diagonals
    minus along the axes (a square's mass reaches into its corners: 2.4 − 1.8 = 0.6; a circle is
    isotropic: 0). Both are moment ratios, so blur, JPEG and noise move them only a little.
    """
    ys, xs = np.indices(weights.shape, dtype=np.float64)
    m = weights.sum()
    dx = xs - (weights * xs).sum() / m
    dy = ys - (weights * ys).sum() / m

    def moment(u: np.ndarray, k: int) -> float:
        return float((weights * u**k).sum() / m)

    def kurtosis(u: np.ndarray) -> float:
        return moment(u, 4) / max(moment(u, 2), 1e-9) ** 2

    skew = moment(dy, 3) / max(moment(dy, 2), 1e-9) ** 1.5
    diag = (kurtosis((dx + dy) / np.sqrt(2)) + kurtosis((dx - dy) / np.sqrt(2))) / 2
    axes = (kurtosis(dx) + kurtosis(dy)) / 2
    return skew, diag - axes


def classify_shape(weights: np.ndarray) -> str:
    """``triangle``, ``square`` or ``circle`` from an object's ``[H, W]`` coverage weights."""
    skew, corner = shape_features(weights)
    if skew < TRIANGLE_SKEW:
        return "triangle"
    return "square" if corner > SQUARE_CORNER else "circle"


def detect(image) -> list[Detection]:
    """Objects in an RGB image (PIL, ``[H, W, 3]`` uint8, or ``[3, H, W]`` float in [0, 1]).

    Colour cores (pixels close to one palette colour) name and count objects; the object's extent
    for the shape test is where pixels are at least half way from the background to its colour.
    """
    return analyse(image).detections


@dataclass
class Analysis:
    """``detections`` plus the ``[H, W]`` boolean maps they came from: ``foreground`` (differs from the
    background), ``core`` (close to a palette colour) and ``objects`` (covered by a detection)."""

    detections: list[Detection]
    foreground: np.ndarray
    core: np.ndarray
    objects: np.ndarray


_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity


def _toward(px: np.ndarray, background: np.ndarray, name: str) -> np.ndarray:
    """``[H, W]`` position of each pixel on the line from the background (0) to colour ``name`` (1)."""
    direction = np.array(COLORS[name], dtype=np.float32) - background
    return ((px - background) @ direction) / float(direction @ direction)


def analyse(image) -> Analysis:
    """Detections and the pixel maps behind them (see :func:`detect`)."""
    px = _as_array(image)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.linalg.norm(px - background, axis=-1) > FOREGROUND_DISTANCE
    regions, _ = ndimage.label(foreground, structure=_EIGHT)
    dist = np.linalg.norm(px[..., None, :] - _PALETTE, axis=-1)  # [H, W, K]
    label = dist.argmin(-1)
    core = foreground & (dist.min(-1) < COLOR_DISTANCE)
    min_area = MIN_AREA * px.shape[0] * px.shape[1] / 64**2
    cores = []
    for k, name in enumerate(_NAMES):
        comps, _ = ndimage.label(core & (label == k), structure=_EIGHT)
        for i, sl in enumerate(ndimage.find_objects(comps), start=1):
            mask = comps == i
            if mask.sum() >= min_area:
                region = np.bincount(regions[mask]).argmax()
                cores.append((name, mask, region))
    shared = np.bincount([r for _, _, r in cores], minlength=regions.max() + 1)
    extents = []
    for name, mask, region in cores:
        if shared[region] == 1:
            # the object's edge is where the pixel is half way from the background to its colour
            halfway, _ = ndimage.label((_toward(px, background, name) > 0.5) & (regions == region), structure=_EIGHT)
            extents.append(halfway == np.bincount(halfway[mask]).argmax())
        else:  # touching objects of different colours: fall back to the colour core
            extents.append(ndimage.binary_dilation(mask))
    grown = [ndimage.binary_dilation(e) for e in extents]
    taken = np.sum(grown, axis=0) if grown else None  # [H, W] how many objects claim each pixel
    found: list[Detection] = []
    for j, ((name, _, _), extent) in enumerate(zip(cores, extents)):
        # coverage weights: blurred edges included, pixels of the other objects left out
        zone = ndimage.binary_dilation(grown[j]) & ((taken - grown[j] == 0) | extent)
        weights = np.clip(_toward(px, background, name), 0.0, 1.0) * zone
        if weights.sum() < 0.5 * extent.sum():  # colour far off the background-to-palette line
            weights = extent.astype(np.float64)
        ys, xs = np.nonzero(extent)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        area = int(extent.sum())
        m = float(weights.sum())
        cy, cx = (float((weights * g).sum()) / m for g in np.indices(weights.shape))
        found.append(Detection(classify_shape(weights), name, cx, cy, area, (x0, y0, x1, y1),
                               area / float((x1 - x0) * (y1 - y0))))
    objects = np.any(extents, axis=0) if extents else np.zeros(foreground.shape, dtype=bool)
    return Analysis(found, foreground, core, objects)


POSITION_THRESHOLD = 0.1  # GenEval: centre offsets shrink by 0.1·(sum of box sides) before the test


def relations(obj: Detection, ref: Detection) -> set[str]:
    """GenEval's ``relative_position``: the relations of ``obj`` to ``ref`` from their box centres.

    Each axis offset is shrunk towards 0 by ``0.1·(box side of obj + box side of ref)``; a relation
    holds when the shrunk offset along its axis is over half the length of the raw centre offset.
    """
    from diffalign.eval.geneval import (
        relative_position,  # the one implementation of GenEval's rule
    )

    return relative_position(obj.bbox, ref.bbox, POSITION_THRESHOLD)


def evaluate(image, prompt: ShapesPrompt | str, detections: list[Detection] | None = None) -> EvalResult:
    """Check every claim of ``prompt`` on ``image`` with GenEval's rules; ``correct`` when all hold.

    Per include item: at least ``count`` objects of its class (the ``count`` largest stand for
    GenEval's most confident detections); if it names a colour, those ``count`` objects have it; if
    it has a ``position`` ``[relation, i]``, each of them is in that relation to each object matched
    by item ``i`` (which must itself have matched). Per exclude item: fewer than ``count`` objects
    of its class (so counting prompts need the exact number). ``claims`` lists each check and its
    outcome; ``fraction`` is the share that hold.
    """
    if isinstance(prompt, str):
        prompt = parse_prompt(prompt)
    dets = detect(image) if detections is None else detections
    claims: list[tuple[str, bool]] = []
    groups: list[list[Detection] | None] = []
    for item in prompt.include:
        cls, n = item["class"], item["count"]
        found = sorted((d for d in dets if d.shape == cls), key=lambda d: -d.area)[:n]
        matched = len(found) >= n
        claims.append((f"at least {n} {cls}", matched))
        if "color" in item:
            ok = matched and all(d.color == item["color"] for d in found)
            claims.append((f"{n} {item['color']} {cls}", ok))
            matched = matched and ok
        if "position" in item:
            relation, i = item["position"]
            ref = groups[i]
            ok = matched and ref is not None and all(relation in relations(o, r) for o in found for r in ref)
            claims.append((f"{cls} {relation} {prompt.include[i]['class']}", ok))
            matched = matched and ok
        groups.append(found if matched else None)
    for item in prompt.exclude:
        n = sum(d.shape == item["class"] for d in dets)
        claims.append((f"fewer than {item['count']} {item['class']}", n < item["count"]))
    correct = all(ok for _, ok in claims)
    return EvalResult(correct, claims, sum(ok for _, ok in claims) / max(1, len(claims)))


def shapes_eval(images: Sequence, prompts: Sequence[ShapesPrompt | str]) -> dict[str, float]:
    """GenEval-style score of ``images[i]`` for ``prompts[i]`` (images as :func:`detect` takes them).

    Returns the share of correct images per task and ``overall``, the mean of the task means (over
    the tasks present), as GenEval's ``summary_scores.py``.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    per_task: dict[str, list[bool]] = {}
    for image, prompt in zip(images, prompts):
        p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        per_task.setdefault(p.task, []).append(evaluate(image, p).correct)
    scores = {t: float(np.mean(per_task[t])) for t in TASKS if t in per_task}
    scores["overall"] = float(np.mean(list(scores.values()))) if scores else 0.0
    return scores
