"""The Shapes world: renderer, grammar, ShapesEval and the oracle."""

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffalign.shapes.evaluate import detect, evaluate, shapes_eval
from diffalign.shapes.grammar import TASKS, all_prompts, make_prompt, parse_prompt, prompt_set, prompts_in_split, scene_for_prompt
from diffalign.shapes.oracle import Oracle
from diffalign.shapes.scene import Scene, ShapeObject, render


def _degrade(img, rng):
    img = img.filter(ImageFilter.GaussianBlur(0.6))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=75)
    arr = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) + rng.normal(0, 6, (64, 64, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def test_render_is_deterministic_and_split_is_disjoint():
    p = make_prompt("color_attr", ["circle", "square"], ["red", "blue"])
    a = render(scene_for_prompt(p, random.Random(3)))
    b = render(scene_for_prompt(p, random.Random(3)))
    assert a.size == (64, 64) and np.array_equal(np.asarray(a), np.asarray(b))
    for task in TASKS[1:]:
        train = {q.text for q in prompts_in_split(task, "train")}
        held = {q.text for q in prompts_in_split(task, "heldout")}
        assert held and train and not (train & held)
        assert len(held) == max(1, round(0.25 * len(all_prompts(task))))
    assert [q.text for q in prompt_set("heldout", 3, seed=1)] == [q.text for q in prompt_set("heldout", 3, seed=1)]
    assert parse_prompt("a photo of a circle right of a square").include[1]["position"] == ["right of", 0]
    with pytest.raises(ValueError, match="not a caption"):
        parse_prompt("a photo of a dog")


def test_shapes_eval_reads_clean_and_degraded_renders():
    rng = random.Random(0)
    prompts = prompt_set("train", 50, seed=7)
    clean = [render(scene_for_prompt(p, rng)) for p in prompts]
    scores = shapes_eval(clean, prompts)
    assert scores["overall"] == 1.0  # measured: every clean render is read back correctly
    noisy = np.random.default_rng(0)
    degraded = shapes_eval([_degrade(img, noisy) for img in clean], prompts)
    assert degraded["overall"] >= 0.95  # measured 0.98 on blur + JPEG q75 + noise


@pytest.mark.parametrize("wrong", ["color", "count", "position", "shape"])
def test_shapes_eval_rejects_wrong_scenes(wrong):
    bg = (230, 230, 230)
    red_c, blue_s = ShapeObject("circle", "red", 16, 32, 16), ShapeObject("square", "blue", 48, 32, 16)
    cases = {
        "color": ("a photo of a red circle and a blue square", [ShapeObject("circle", "green", 16, 32, 16), blue_s]),
        "count": ("a photo of two circles", [red_c, ShapeObject("circle", "red", 48, 32, 16),
                                              ShapeObject("circle", "blue", 32, 10, 14)]),
        "position": ("a photo of a circle right of a square", [red_c, blue_s]),
        "shape": ("a photo of a triangle", [red_c]),
    }
    text, objects = cases[wrong]
    assert not evaluate(render(Scene(objects, bg)), text).correct
    fixed = {"color": [red_c, blue_s], "count": objects[:2], "shape": [ShapeObject("triangle", "red", 16, 32, 16)],
             "position": [ShapeObject("circle", "red", 48, 32, 16), ShapeObject("square", "blue", 16, 32, 16)]}
    assert evaluate(render(Scene(fixed[wrong], bg)), text).correct


def test_detect_names_shape_colour_and_centre():
    img = render(Scene([ShapeObject("triangle", "orange", 20, 40, 20)], (240, 240, 240)))
    (d,) = detect(img)
    assert (d.shape, d.color) == ("triangle", "orange")
    assert abs(d.cx - 20) < 1.5 and abs(d.cy - 40) < 4  # triangle's area centroid sits below the box centre


def test_oracle_prefers_correct_images_and_its_noise_rate():
    rng = random.Random(1)
    prompts = prompt_set("train", 20, seed=2)
    good = [render(scene_for_prompt(p, rng)) for p in prompts]
    bad = [render(Scene([], (230, 230, 230))) for _ in prompts]
    exact = Oracle(noise=0.0)
    assert exact.label_pairs(good, bad, prompts) == [1.0] * len(prompts)
    assert exact.prefer(good[0], good[0], prompts[0]) == 0.5  # identical images tie
    noisy = Oracle(noise=0.3, seed=0)
    labels = noisy.label_pairs(good * 5, bad * 5, prompts * 5)  # 600 labels
    flipped = labels.count(0.0) / len(labels)
    assert abs(flipped - 0.3) < 3 * (0.3 * 0.7 / len(labels)) ** 0.5
    assert Oracle(noise=0.3, seed=0).label_pairs(good * 5, bad * 5, prompts * 5) == labels  # seeded
    rate, lo, hi = exact.win_rate(good, bad, prompts)
    assert rate == 1.0 and lo <= hi


def test_oracle_quality_term_prefers_crisp_over_blurred():
    p = make_prompt("colors", ["square"], ["blue"])
    img = render(scene_for_prompt(p, random.Random(0)))
    blurred = img.filter(ImageFilter.GaussianBlur(2.0))
    o = Oracle(noise=0.0)
    assert o.utility(img, p) > o.utility(blurred, p)
