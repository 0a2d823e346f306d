"""Captions of the Shapes world, mirroring GenEval's six tasks and its metadata format.

=============== ============================================ ======================================
task            caption                                      metadata ``include`` (GenEval format)
=============== ============================================ ======================================
single_object   a photo of a circle                          [{class: circle, count: 1}]
two_object      a photo of a circle and a square             [{circle, 1}, {square, 1}]
counting        a photo of three triangles                   [{triangle, 3}], exclude [{triangle, 4}]
colors          a photo of a red square                      [{square, 1, color: red}]
position        a photo of a circle right of a square        [{square, 1}, {circle, 1, position: [right of, 0]}]
color_attr      a photo of a red circle and a blue square    [{circle, 1, red}, {square, 1, blue}]
=============== ============================================ ======================================

As in GenEval, a ``position`` entry ``[relation, i]`` on include item ``j`` means "item ``j`` is
``relation`` item ``i``" (the caption names item ``j`` first).

Split: in each task, the quarter of the combinations with the largest caption hashes (at least one)
is ``heldout``, the rest ``train``, so held-out prompts are unseen combinations of seen words.
``single_object`` has only three combinations; it is in both splits. The split is per task: a
colour-shape pair held out of ``colors`` may still occur inside a ``color_attr`` training prompt.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from diffalign.shapes.scene import (
    COLORS,
    IMAGE_SIZE,
    MAX_SIZE,
    MIN_SIZE,
    SHAPES,
    Scene,
    ShapeObject,
    overlaps,
    random_background,
)

TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
NUMBERS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
HELDOUT_FRACTION = 0.25


@dataclass
class ShapesPrompt:
    """A caption and its GenEval-style metadata.

    ``include``/``exclude`` items are ``{"class", "count", optional "color", optional "position"}``
    dicts as in GenEval's ``evaluation_metadata.jsonl``. ``position`` repeats the one relation of a
    position prompt: ``("left of", 0)`` means ``include[1]`` is left of ``include[0]`` (it is filled
    in from the include items when not given).
    """

    text: str
    task: str
    include: list[dict]
    exclude: list[dict] = field(default_factory=list)
    position: tuple[str, int] | None = None

    def __post_init__(self):
        if self.position is None:
            for item in self.include:
                if "position" in item:
                    self.position = tuple(item["position"])  # type: ignore[assignment]

    def metadata(self) -> dict:
        """This prompt as a line of GenEval's ``evaluation_metadata.jsonl`` (tag, include, exclude, prompt)."""
        out = {"tag": self.task, "include": [dict(item) for item in self.include], "prompt": self.text}
        if self.exclude:
            out["exclude"] = [dict(item) for item in self.exclude]
        return out

    @classmethod
    def from_metadata(cls, line: dict) -> ShapesPrompt:
        """The inverse of :meth:`metadata`."""
        return cls(line["prompt"], line["tag"], [dict(i) for i in line["include"]],
                   [dict(i) for i in line.get("exclude", [])])


def _a(word: str) -> str:
    return f"a {word}"


def _plural(shape: str) -> str:
    return shape + "s"


def make_prompt(task: str, shapes: list[str], colors: list[str | None] | None = None,
                count: int = 1, relation: str | None = None) -> ShapesPrompt:
    """Build the caption and metadata of one combination."""
    colors = colors or [None] * len(shapes)

    def noun(i: int) -> str:
        return f"{colors[i]} {shapes[i]}" if colors[i] else shapes[i]

    def item(i: int, n: int = 1) -> dict:
        d = {"class": shapes[i], "count": n}
        if colors[i]:
            d["color"] = colors[i]
        return d

    if task in ("single_object", "colors"):
        return ShapesPrompt(f"a photo of {_a(noun(0))}", task, [item(0)])
    if task in ("two_object", "color_attr"):
        return ShapesPrompt(f"a photo of {_a(noun(0))} and {_a(noun(1))}", task, [item(0), item(1)])
    if task == "counting":
        return ShapesPrompt(f"a photo of {NUMBERS[count]} {_plural(shapes[0])}", task, [item(0, count)],
                            [{"class": shapes[0], "count": count + 1}])
    if task == "position":
        # caption: "<shapes[0]> <relation> <shapes[1]>"; GenEval lists the reference first
        ref, obj = item(1), dict(item(0), position=[relation, 0])
        return ShapesPrompt(f"a photo of {_a(noun(0))} {relation} {_a(noun(1))}", task, [ref, obj])
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def all_prompts(task: str) -> list[ShapesPrompt]:
    """Every combination of a task, in a fixed order."""
    cs = list(COLORS)
    if task == "single_object":
        return [make_prompt(task, [s]) for s in SHAPES]
    if task == "two_object":
        return [make_prompt(task, [a, b]) for a in SHAPES for b in SHAPES if a != b]
    if task == "counting":
        return [make_prompt(task, [s], count=n) for s in SHAPES for n in NUMBERS]
    if task == "colors":
        return [make_prompt(task, [s], [c]) for s in SHAPES for c in cs]
    if task == "position":
        return [make_prompt(task, [a, b], relation=r) for a in SHAPES for b in SHAPES if a != b for r in RELATIONS]
    if task == "color_attr":
        return [make_prompt(task, [a, b], [ca, cb]) for a in SHAPES for b in SHAPES if a != b
                for ca in cs for cb in cs if ca != cb]
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def split_of(prompt: ShapesPrompt) -> str:
    """``train``, ``heldout`` or ``both`` (single objects): the quarter of each task's combinations
    with the largest caption hashes (at least one) is held out."""
    if prompt.task == "single_object":
        return "both"
    if not _HELDOUT:
        for task in TASKS[1:]:
            ranked = sorted(all_prompts(task), key=lambda p: _hash(p.text))
            n = max(1, round(HELDOUT_FRACTION * len(ranked)))
            _HELDOUT.update(p.text for p in ranked[-n:])
    return "heldout" if prompt.text in _HELDOUT else "train"


_HELDOUT: set[str] = set()


def prompts_in_split(task: str, split: str) -> list[ShapesPrompt]:
    """Every combination of ``task`` in ``split`` (``train``, ``heldout`` or ``all``)."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', not {split!r}")
    return [p for p in all_prompts(task) if split == "all" or split_of(p) in (split, "both")]


def sample_prompt(rng: random.Random, task: str | None = None, split: str = "train") -> ShapesPrompt:
    """A random prompt of ``task`` (uniform over tasks when ``None``) from ``split``."""
    task = task or rng.choice(TASKS)
    return rng.choice(prompts_in_split(task, split))


def prompt_set(split: str, n_per_task: int, seed: int = 0) -> list[ShapesPrompt]:
    """``n_per_task`` prompts of each task from ``split``, deterministic in ``seed``, balanced over tasks.

    Combinations are cycled in a shuffled order, so small sets have no repeats where possible.
    """
    rng = random.Random(seed)
    out: list[ShapesPrompt] = []
    for task in TASKS:
        pool = prompts_in_split(task, split)
        rng.shuffle(pool)
        out.extend(pool[i % len(pool)] for i in range(n_per_task))
    return out


def parse_prompt(text: str) -> ShapesPrompt:
    """The :class:`ShapesPrompt` of a caption of the grammar (``ValueError`` for any other text)."""
    key = " ".join(text.lower().split())
    if not _BY_TEXT:
        _BY_TEXT.update({p.text: p for task in TASKS for p in all_prompts(task)})
    if key not in _BY_TEXT:
        raise ValueError(f"{text!r} is not a caption of the Shapes grammar")
    return _BY_TEXT[key]


_BY_TEXT: dict[str, ShapesPrompt] = {}


# ------------------------------------------------------------------ scenes for prompts

_REL_AXIS = {"left of": (-1, 0), "right of": (1, 0), "above": (0, -1), "below": (0, 1)}


def scene_for_prompt(prompt: ShapesPrompt, rng: random.Random, image_size: int = IMAGE_SIZE) -> Scene:
    """A random scene that satisfies every claim of ``prompt`` (objects never overlap)."""
    for _ in range(200):
        objs: list[ShapeObject] = []
        ok = True
        for item in prompt.include:
            for _k in range(item["count"]):
                color = item.get("color") or rng.choice(list(COLORS))
                obj = _place(item["class"], color, objs, rng, image_size, item.get("position"))
                if obj is None:
                    ok = False
                    break
                objs.append(obj)
            if not ok:
                break
        if ok:
            return Scene(objs, random_background(rng), image_size)
    raise RuntimeError(f"could not place the objects of {prompt.text!r}")


def _place(shape: str, color: str, placed: list[ShapeObject], rng: random.Random, image_size: int,
           position: list | None) -> ShapeObject | None:
    for _ in range(100):
        size = rng.uniform(MIN_SIZE, MAX_SIZE)
        lo, hi = size / 2 + 2, image_size - size / 2 - 2
        obj = ShapeObject(shape, color, rng.uniform(lo, hi), rng.uniform(lo, hi), size)
        if position is not None:
            relation, index = position
            ref = placed[index]
            ax, ay = _REL_AXIS[relation]
            main = (obj.cx - ref.cx) * ax + (obj.cy - ref.cy) * ay       # along the relation
            side = (obj.cx - ref.cx) * ay + (obj.cy - ref.cy) * ax       # across it
            if main < 14 or abs(side) > 0.5 * main:
                continue
        if not any(overlaps(obj, other) for other in placed):
            return obj
    return None
