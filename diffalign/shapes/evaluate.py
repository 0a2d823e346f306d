"""ShapesEval: read a generated image back and check each claim of its caption, scored like GenEval.

Detection is exact image analysis, no learned model: the background is the median border colour,
foreground pixels are labelled with the nearest palette colour, connected components of one colour
are objects; the centroid height (triangles) and the fill ratio of the bounding box (square ≈ 1,
circle ≈ π/4) name the shape. The rules then follow GenEval: every ``include`` item needs at least
``count`` matching objects (of its colour, if it names one), ``exclude`` items must have fewer than
``count``, and a ``position`` holds when the centres are offset along the relation's axis.
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
MIN_AREA = 16                # components smaller than this (pixels at 64 px) are specks
SQUARE_FILL = 0.88           # fill ratio above which a (non-triangle) object is a square
TRIANGLE_CENTROID = 0.58     # relative height of the area centroid above which an object is a triangle


@dataclass
class Detection:
    """An object found in an image: centre ``(cx, cy)`` and ``bbox = (x0, y0, x1, y1)`` in pixels."""

    shape: str
    color: str
    cx: float
    cy: float
    area: int
    bbox: tuple[int, int, int, int]
    fill: float


@dataclass
class EvalResult:
    correct: bool
    claims: list[tuple[str, bool]]

    @property
    def fraction(self) -> float:
        """Share of the caption's claims that hold (1.0 for a correct image)."""
        return sum(ok for _, ok in self.claims) / max(1, len(self.claims))


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[0] == 3:  # [3, H, W] in [0, 1]
        arr = arr.transpose(1, 2, 0) * 255.0
    return arr


def classify_shape(mask: np.ndarray) -> tuple[str, float]:
    """Shape of a boolean object mask cropped to its bounding box, and its fill ratio.

    An apex-up triangle has its area centroid two thirds down its box (circles and squares: half
    way), which survives blur; squares fill their box (1.0), circles π/4.
    """
    h, w = mask.shape
    fill = float(mask.sum()) / float(h * w)
    ys = np.nonzero(mask)[0]
    if (ys.mean() + 0.5) / h > TRIANGLE_CENTROID:
        return "triangle", fill
    return ("square" if fill > SQUARE_FILL else "circle"), fill


def detect(image) -> list[Detection]:
    """Objects in an RGB image (PIL, ``[H, W, 3]`` uint8, or ``[3, H, W]`` float in [0, 1]).

    Colour cores (pixels close to one palette colour) name and count objects; the object's extent
    for the shape test is where pixels are at least half way from the background to its colour.
    """
    return analyse(image).detections


@dataclass
class Analysis:
    """``detections`` plus the ``[H, W]`` boolean maps they came from: ``foreground`` (differs from the
    background) and ``core`` (close to a palette colour)."""

    detections: list[Detection]
    foreground: np.ndarray
    core: np.ndarray


def analyse(image) -> Analysis:
    """Detections and the pixel maps behind them (see :func:`detect`)."""
    px = _as_array(image)
    border = np.concatenate([px[0], px[-1], px[:, 0], px[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.linalg.norm(px - background, axis=-1) > FOREGROUND_DISTANCE
    regions, _ = ndimage.label(foreground, structure=np.ones((3, 3)))
    dist = np.linalg.norm(px[..., None, :] - _PALETTE, axis=-1)  # [H, W, K]
    label = dist.argmin(-1)
    core = foreground & (dist.min(-1) < COLOR_DISTANCE)
    cores = []
    for k, name in enumerate(_NAMES):
        comps, _ = ndimage.label(core & (label == k), structure=np.ones((3, 3)))
        for i, sl in enumerate(ndimage.find_objects(comps), start=1):
            mask = comps == i
            if mask.sum() >= MIN_AREA:
                region = np.bincount(regions[mask]).argmax()
                cores.append((name, mask, region))
    shared = np.bincount([r for _, _, r in cores], minlength=regions.max() + 1)
    found: list[Detection] = []
    for name, mask, region in cores:
        if shared[region] == 1:
            # the object's edge is where the pixel is half way from the background to its colour
            direction = np.array(COLORS[name], dtype=np.float32) - background
            t = ((px - background) @ direction) / float(direction @ direction)
            halfway, _ = ndimage.label((t > 0.5) & (regions == region), structure=np.ones((3, 3)))
            extent = halfway == np.bincount(halfway[mask]).argmax()
        else:  # touching objects of different colours: fall back to the colour core
            extent = ndimage.binary_dilation(mask)
        sl = ndimage.find_objects(extent.astype(np.int32))[0]
        shape, fill = classify_shape(extent[sl])
        ys, xs = np.nonzero(extent)
        found.append(Detection(shape, name, float(xs.mean()), float(ys.mean()), int(extent.sum()),
                               (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop), fill))
    return Analysis(found, foreground, core)


def _relation_holds(obj: Detection, ref: Detection, relation: str) -> bool:
    """GenEval-style: centres offset beyond 0.1·(sizes) along the axis, and mostly along it."""
    dx, dy = obj.cx - ref.cx, obj.cy - ref.cy
    wx = 0.1 * ((obj.bbox[2] - obj.bbox[0]) + (ref.bbox[2] - ref.bbox[0]))
    wy = 0.1 * ((obj.bbox[3] - obj.bbox[1]) + (ref.bbox[3] - ref.bbox[1]))
    norm = max(1e-6, float(np.hypot(dx, dy)))
    if relation == "left of":
        return dx < -wx and -dx / norm > 0.5
    if relation == "right of":
        return dx > wx and dx / norm > 0.5
    if relation == "above":
        return dy < -wy and -dy / norm > 0.5
    if relation == "below":
        return dy > wy and dy / norm > 0.5
    raise ValueError(f"unknown relation {relation!r}")


def evaluate(image, prompt: ShapesPrompt | str, detections: list[Detection] | None = None) -> EvalResult:
    """Check every claim of ``prompt`` on ``image``; ``correct`` when all hold (GenEval's per-image verdict)."""
    if isinstance(prompt, str):
        prompt = parse_prompt(prompt)
    dets = detect(image) if detections is None else detections
    claims: list[tuple[str, bool]] = []
    matched: list[list[Detection]] = []
    for item in prompt.include:
        of_class = [d for d in dets if d.shape == item["class"]]
        claims.append((f"at least {item['count']} {item['class']}", len(of_class) >= item["count"]))
        if "color" in item:
            colored = [d for d in of_class if d.color == item["color"]]
            claims.append((f"{item['count']} {item['color']} {item['class']}", len(colored) >= item["count"]))
            of_class = colored
        matched.append(of_class)
    for item in prompt.exclude:
        n = sum(d.shape == item["class"] for d in dets)
        claims.append((f"fewer than {item['count']} {item['class']}", n < item["count"]))
    for j, item in enumerate(prompt.include):
        if "position" in item:
            relation, i = item["position"]
            ok = any(_relation_holds(o, r, relation) for o in matched[j] for r in matched[i])
            claims.append((f"{item['class']} {relation} {prompt.include[i]['class']}", ok))
    return EvalResult(all(ok for _, ok in claims), claims)


def shapes_eval(images: Sequence, prompts: Sequence[ShapesPrompt | str]) -> dict[str, float]:
    """GenEval-style score: accuracy per task and ``overall`` = mean of the task means (tasks present)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    per_task: dict[str, list[bool]] = {}
    for image, prompt in zip(images, prompts):
        p = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        per_task.setdefault(p.task, []).append(evaluate(image, p).correct)
    scores = {t: float(np.mean(per_task[t])) for t in TASKS if t in per_task}
    scores["overall"] = float(np.mean(list(scores.values()))) if scores else 0.0
    return scores
