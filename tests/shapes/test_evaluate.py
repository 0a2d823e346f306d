"""ShapesEval: reads rendered scenes back, rejects wrong ones, survives degradation, scores like GenEval."""

import io
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffalign.shapes.evaluate import Detection, detect, evaluate, relations, shapes_eval
from diffalign.shapes.grammar import TASKS, parse_prompt, prompt_set, scene_for_prompt
from diffalign.shapes.scene import COLORS, Scene, ShapeObject, render

BG = (230, 230, 230)


def degrade(img: Image.Image, rng: np.random.Generator, blur: float = 0.6, quality: int = 75,
            sigma: float = 6.0) -> Image.Image:
    """Gaussian blur, JPEG and additive Gaussian noise: a stand-in for a diffusion model's flaws."""
    img = img.filter(ImageFilter.GaussianBlur(blur))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    arr = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) + rng.normal(0, sigma, (64, 64, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def rendered():
    rng = random.Random(0)
    prompts = prompt_set("all", 50, seed=7)  # 300 prompts, 50 per task, both splits
    return prompts, [render(scene_for_prompt(p, rng)) for p in prompts]


def test_reads_back_clean_renders(rendered):
    prompts, images = rendered
    scores = shapes_eval(images, prompts)
    assert set(scores) == {*TASKS, "overall"}
    assert scores["overall"] >= 0.99  # measured 1.0 (also on 1,200 renders)


@pytest.mark.parametrize("blur,quality,sigma,floor", [(0.6, 75, 6.0, 0.97), (1.0, 50, 10.0, 0.95)])
def test_survives_blur_jpeg_and_noise(rendered, blur, quality, sigma, floor):
    prompts, images = rendered
    rng = np.random.default_rng(0)
    scores = shapes_eval([degrade(img, rng, blur, quality, sigma) for img in images], prompts)
    # measured on 1,200 renders: 1.0 (mild) and 0.997 (blur 1.0 + JPEG q50 + noise σ=10)
    assert scores["overall"] >= floor and min(scores[t] for t in TASKS) >= floor - 0.03


red_circle, blue_square = ShapeObject("circle", "red", 16, 32, 16), ShapeObject("square", "blue", 48, 32, 16)
WRONG = {  # caption, wrong scene, right scene
    "colour": ("a photo of a red circle and a blue square",
               [ShapeObject("circle", "green", 16, 32, 16), blue_square], [red_circle, blue_square]),
    "swapped colours": ("a photo of a red circle and a blue square",
                        [ShapeObject("circle", "blue", 16, 32, 16), ShapeObject("square", "red", 48, 32, 16)],
                        [red_circle, blue_square]),
    "too many": ("a photo of two circles",
                 [red_circle, ShapeObject("circle", "red", 48, 32, 16), ShapeObject("circle", "blue", 32, 10, 14)],
                 [red_circle, ShapeObject("circle", "red", 48, 32, 16)]),
    "too few": ("a photo of three squares", [blue_square, ShapeObject("square", "red", 16, 32, 16)],
                [blue_square, ShapeObject("square", "red", 16, 32, 16), ShapeObject("square", "red", 32, 52, 14)]),
    "missing object": ("a photo of a circle and a square", [red_circle], [red_circle, blue_square]),
    "position": ("a photo of a circle right of a square", [red_circle, blue_square],
                 [ShapeObject("circle", "red", 48, 32, 16), ShapeObject("square", "blue", 16, 32, 16)]),
    "vertical position": ("a photo of a triangle above a circle",
                          [ShapeObject("triangle", "orange", 32, 48, 18), ShapeObject("circle", "red", 32, 16, 16)],
                          [ShapeObject("triangle", "orange", 32, 16, 18), ShapeObject("circle", "red", 32, 48, 16)]),
    "shape": ("a photo of a triangle", [red_circle], [ShapeObject("triangle", "red", 16, 32, 16)]),
    "square for circle": ("a photo of a purple circle", [ShapeObject("square", "purple", 30, 30, 14)],
                          [ShapeObject("circle", "purple", 30, 30, 14)]),
}


@pytest.mark.parametrize("case", WRONG)
def test_rejects_wrong_scenes_and_accepts_fixed_ones(case):
    text, wrong, right = WRONG[case]
    bad = evaluate(render(Scene(wrong, BG)), text)
    assert not bad.correct and bad.fraction < 1.0 and not all(ok for _, ok in bad.claims)
    good = evaluate(render(Scene(right, BG)), text)
    assert good.correct and good.fraction == 1.0


def test_claims_and_fraction():
    img = render(Scene([ShapeObject("circle", "green", 16, 32, 16), blue_square], BG))
    r = evaluate(img, parse_prompt("a photo of a red circle and a blue square"))
    assert r.claims == [("at least 1 circle", True), ("1 red circle", False),
                        ("at least 1 square", True), ("1 blue square", True)]
    assert r.fraction == 0.75


def test_detect_names_shape_colour_centre_and_ignores_specks():
    scene = Scene([ShapeObject("triangle", "orange", 20, 40, 20), ShapeObject("square", "green", 48, 16, 12)], BG)
    arr = np.asarray(render(scene)).copy()
    arr[5:7, 30:32] = (220, 30, 30)  # a 2×2 red speck
    dets = sorted(detect(arr), key=lambda d: d.cx)
    assert [(d.shape, d.color) for d in dets] == [("triangle", "orange"), ("square", "green")]
    tri, sq = dets
    assert abs(tri.cx - 20) < 1 and abs(tri.cy - (40 + 20 / 6)) < 1  # a triangle's centroid: 2/3 down its box
    assert abs(sq.cx - 48) < 1 and abs(sq.cy - 16) < 1 and abs(sq.area - 144) < 15
    x0, y0, x1, y1 = tri.bbox
    assert abs((x0 + x1) / 2 - 20) <= 1 and abs((y0 + y1) / 2 - 40) <= 1 and 18 <= x1 - x0 <= 22
    chw = np.asarray(render(scene), dtype=np.float32).transpose(2, 0, 1) / 255  # [3, H, W] in [0, 1]
    assert [(d.shape, d.color) for d in sorted(detect(chw), key=lambda d: d.cx)] == [("triangle", "orange"),
                                                                                    ("square", "green")]
    assert detect(render(Scene([], BG))) == []


def test_relations_follow_geneval_offsets():
    def box(cx, cy, s=10):
        return Detection("circle", "red", cx, cy, s * s, (cx - s // 2, cy - s // 2, cx + s // 2, cy + s // 2))
    assert relations(box(10, 30), box(40, 30)) == {"left of"}
    assert relations(box(40, 30), box(10, 30)) == {"right of"}
    assert relations(box(30, 10), box(30, 40)) == {"above"}
    assert relations(box(30, 31), box(30, 30)) == set()  # offset within 0.1·(sides): no relation
    assert relations(box(10, 10), box(40, 40)) == {"left of", "above"}  # diagonal: both hold
    assert relations(box(10, 25), box(40, 30)) == {"left of"}


def test_overall_is_the_mean_of_task_means():
    rng = random.Random(1)
    single, color = parse_prompt("a photo of a square"), parse_prompt("a photo of a red circle")
    good = render(scene_for_prompt(single, rng))
    blank = render(Scene([], BG))
    scores = shapes_eval([good, good, good, blank], [single, single, single, color])
    assert scores == {"single_object": 1.0, "colors": 0.0, "overall": 0.5}  # pooled would be 0.75
    with pytest.raises(ValueError, match="images but"):
        shapes_eval([good], [])


def test_survives_washed_out_colours_and_a_lit_background(rendered):
    prompts, images = rendered
    ramp = np.linspace(-12, 12, 64)[None, :, None]  # a left-to-right lighting gradient
    shifted = [Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) * 0.85 + 25 + ramp, 0, 255).astype(np.uint8))
               for img in images[::3]]
    assert shapes_eval(shifted, prompts[::3])["overall"] >= 0.97  # measured 1.0


def test_never_crashes_on_junk():
    rng = np.random.default_rng(0)
    junk = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), np.zeros((64, 64, 3), np.uint8),
            np.full((64, 64, 3), 200, np.uint8), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
            Image.new("L", (64, 64), 128), Image.new("RGBA", (64, 64), (200, 20, 20, 255))]
    blobs = np.full((64, 64, 3), 230, np.uint8)
    for k in range(12):  # overlapping rectangles of every colour
        x, y = rng.integers(0, 50, 2)
        blobs[y:y + 14, x:x + 14] = list(COLORS.values())[k % len(COLORS)]
    for image in [*junk, blobs]:
        for p in prompt_set("all", 1):
            r = evaluate(image, p)
            assert 0.0 <= r.fraction <= 1.0 and r.correct == (r.fraction == 1.0)
