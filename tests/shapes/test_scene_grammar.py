"""The Shapes world's renderer and caption grammar: determinism, captions, metadata, split, scenes."""

import itertools
import json
import random

import numpy as np
import pytest

from diffalign.shapes.grammar import (TASKS, ShapesPrompt, all_prompts, make_prompt, parse_prompt, prompt_set,
                                      prompts_in_split, sample_prompt, scene_for_prompt, split_of)
from diffalign.shapes.scene import COLORS, IMAGE_SIZE, SHAPES, Scene, ShapeObject, random_background, render


def test_palette_is_far_apart_and_from_backgrounds():
    assert set(COLORS) == {"red", "green", "blue", "yellow", "purple", "orange"}
    rgb = np.array(list(COLORS.values()), dtype=float)
    gaps = [np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2)]
    assert min(gaps) > 75  # yellow/orange, the closest pair: 81
    rng = random.Random(0)
    for _ in range(200):
        bg = np.array(random_background(rng), dtype=float)
        assert bg.min() >= 190 and bg.max() - bg.min() <= 30  # light and low-saturation
        assert np.linalg.norm(rgb - bg, axis=1).min() > 100


def test_render_is_deterministic_antialiased_and_places_colours():
    scene = Scene([ShapeObject("square", "red", 20.3, 30.7, 16.0), ShapeObject("circle", "blue", 45, 20, 14)],
                  (230, 230, 230))
    a, b = render(scene), render(scene)
    assert a.mode == "RGB" and a.size == (IMAGE_SIZE, IMAGE_SIZE)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    px = np.asarray(a).astype(int)
    assert tuple(px[30, 20]) == COLORS["red"] and tuple(px[20, 45]) == COLORS["blue"]
    assert tuple(px[2, 2]) == (230, 230, 230)
    row = px[31, :40, 1]  # through the square: a fractional edge gives in-between values
    assert ((row > COLORS["red"][1]) & (row < 230)).any()
    with pytest.raises(ValueError, match="unknown shape"):
        render(Scene([ShapeObject("star", "red", 30, 30, 10)], (230, 230, 230)))


def test_captions_and_metadata_mirror_geneval():
    examples = {
        ("single_object", "a photo of a circle"): [{"class": "circle", "count": 1}],
        ("two_object", "a photo of a circle and a square"): [{"class": "circle", "count": 1},
                                                             {"class": "square", "count": 1}],
        ("counting", "a photo of three triangles"): [{"class": "triangle", "count": 3}],
        ("colors", "a photo of a red square"): [{"class": "square", "count": 1, "color": "red"}],
        ("position", "a photo of a circle left of a triangle"): [
            {"class": "triangle", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}],
        ("color_attr", "a photo of a red circle and a blue square"): [
            {"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}],
    }
    for (task, text), include in examples.items():
        p = parse_prompt(text)
        assert (p.task, p.include) == (task, include)
    assert parse_prompt("a photo of three triangles").exclude == [{"class": "triangle", "count": 4}]
    assert parse_prompt("a photo of a circle left of a triangle").position == ("left of", 0)
    assert parse_prompt("a photo of a red square").position is None
    built = ShapesPrompt("x", "position", [{"class": "square", "count": 1},
                                           {"class": "circle", "count": 1, "position": ["above", 0]}])
    assert built.position == ("above", 0)
    every = [p for t in TASKS for p in all_prompts(t)]
    assert len({p.text for p in every}) == len(every)  # one caption per combination
    assert all(p.text == p.text.lower() for p in every)
    with pytest.raises(ValueError, match="not a caption"):
        parse_prompt("a photo of a dog")


def test_metadata_round_trips_through_json():
    for p in prompt_set("all", 3, seed=0):
        line = json.loads(json.dumps(p.metadata()))
        assert line["tag"] == p.task and line["prompt"] == p.text and ("exclude" in line) == (p.task == "counting")
        assert ShapesPrompt.from_metadata(line) == p


def test_split_holds_out_a_quarter_of_unseen_combinations():
    for task in TASKS[1:]:
        train = {p.text for p in prompts_in_split(task, "train")}
        held = {p.text for p in prompts_in_split(task, "heldout")}
        assert train and held and not train & held
        assert len(held) == max(1, round(0.25 * len(all_prompts(task))))
    # single objects appear in both splits
    assert {p.text for p in prompts_in_split("single_object", "heldout")} == {f"a photo of a {s}" for s in SHAPES}
    rng = random.Random(0)
    for _ in range(100):
        assert split_of(sample_prompt(rng, split="heldout")) in ("heldout", "both")
        assert split_of(sample_prompt(rng, task="color_attr")) == "train"


def test_prompt_set_is_deterministic_and_balanced():
    a, b = prompt_set("train", 7, seed=3), prompt_set("train", 7, seed=3)
    assert [p.text for p in a] == [p.text for p in b]
    assert [p.text for p in a] != [p.text for p in prompt_set("train", 7, seed=4)]
    assert [p.task for p in a] == [t for t in TASKS for _ in range(7)]
    colors = [p for p in a if p.task == "colors"]
    assert len({p.text for p in colors}) == 7  # no repeats while the pool lasts


def _relation_of(obj, ref):
    dx, dy = obj.cx - ref.cx, obj.cy - ref.cy
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


@pytest.mark.parametrize("task", TASKS)
def test_scenes_satisfy_their_prompts(task):
    rng = random.Random(task)
    for p in prompt_set("all", 30, seed=1)[TASKS.index(task) * 30:][:30]:
        scene = scene_for_prompt(p, rng)
        objs = scene.objects
        assert len(objs) == sum(item["count"] for item in p.include)
        for item in p.include:
            mine = [o for o in objs if o.shape == item["class"]]
            assert len(mine) >= item["count"]
            if "color" in item:
                assert sum(o.color == item["color"] for o in mine) >= item["count"]
        for o in objs:
            assert 10 <= o.size <= 22 and o.color in COLORS and o.shape in SHAPES
            assert o.size / 2 <= o.cx <= IMAGE_SIZE - o.size / 2 and o.size / 2 <= o.cy <= IMAGE_SIZE - o.size / 2
        for o1, o2 in itertools.combinations(objs, 2):  # no overlap of bounding squares
            reach = (o1.size + o2.size) / 2
            assert abs(o1.cx - o2.cx) >= reach or abs(o1.cy - o2.cy) >= reach
        if p.position:
            relation, _ = p.position
            assert _relation_of(objs[1], objs[0]) == relation
    assert scene_for_prompt(p, random.Random(5)) == scene_for_prompt(p, random.Random(5))


def test_make_prompt_rejects_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        make_prompt("counting_stars", ["circle"])
