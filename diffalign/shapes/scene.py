"""Scenes of coloured shapes and their renderer: the Shapes world's "photos".

A :class:`Scene` is a background colour and a list of :class:`ShapeObject` (shape, colour, centre,
size in pixels). :func:`render` draws it deterministically, antialiased (4× supersampling).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated and far from the pale backgrounds (> 150 in RGB); the closest pair, yellow/orange, is 81 apart.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 180),
    "orange": (245, 125, 15),
}
MIN_SIZE, MAX_SIZE = 12.0, 22.0
_SUPERSAMPLE = 4


@dataclass
class ShapeObject:
    """One shape: ``size`` is the side of its bounding square in pixels, ``(cx, cy)`` its centre."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float


@dataclass
class Scene:
    objects: list[ShapeObject] = field(default_factory=list)
    background: tuple[int, int, int] = (235, 235, 235)
    image_size: int = IMAGE_SIZE


def random_background(rng: random.Random) -> tuple[int, int, int]:
    """A light, low-saturation background: greys, off-whites and pale tints."""
    base = rng.randint(205, 245)
    return tuple(min(255, max(0, base + rng.randint(-10, 10))) for _ in range(3))  # type: ignore[return-value]


def shape_polygon(obj: ShapeObject, scale: float = 1.0) -> list[tuple[float, float]] | None:
    """Vertices of a square or triangle (``None`` for circles), in pixels times ``scale``."""
    h = obj.size / 2
    cx, cy = obj.cx * scale, obj.cy * scale
    h *= scale
    if obj.shape == "square":
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if obj.shape == "triangle":  # apex up, base at the bottom of the bounding square
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    return None


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image of ``scene.image_size`` pixels; the same scene gives the same pixels."""
    s = scene.image_size * _SUPERSAMPLE
    img = Image.new("RGB", (s, s), tuple(scene.background))
    draw = ImageDraw.Draw(img)
    for obj in scene.objects:
        if obj.shape not in SHAPES or obj.color not in COLORS:
            raise ValueError(f"unknown shape {obj.shape!r} or colour {obj.color!r}; "
                             f"choose from {SHAPES} and {tuple(COLORS)}")
        fill = COLORS[obj.color]
        poly = shape_polygon(obj, _SUPERSAMPLE)
        if poly is None:
            h = obj.size / 2 * _SUPERSAMPLE
            cx, cy = obj.cx * _SUPERSAMPLE, obj.cy * _SUPERSAMPLE
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    return img.resize((scene.image_size, scene.image_size), Image.Resampling.BOX)


def overlaps(a: ShapeObject, b: ShapeObject, gap: float = 3.0) -> bool:
    """Whether the bounding squares of ``a`` and ``b``, grown by ``gap`` pixels, intersect."""
    reach = (a.size + b.size) / 2 + gap
    return abs(a.cx - b.cx) < reach and abs(a.cy - b.cy) < reach
