"""The oracle annotator: utility ordering, Bradley–Terry labels with noise and ties, win rate."""

import io
import math
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffalign.shapes.grammar import parse_prompt, prompt_set, scene_for_prompt
from diffalign.shapes.oracle import Oracle, to_jpeg_bytes, visual_quality
from diffalign.shapes.scene import Scene, ShapeObject, render

BG = (230, 230, 230)
TEXT = "a photo of a red circle and a blue square"
RIGHT = [ShapeObject("circle", "red", 16, 32, 16), ShapeObject("square", "blue", 48, 32, 16)]
WRONG_COLOUR = [ShapeObject("circle", "green", 16, 32, 16), RIGHT[1]]


@pytest.fixture(scope="module")
def pairs():
    """20 prompts with a correct render and a wrong one (one claim broken: an object left out)."""
    rng = random.Random(1)
    prompts = prompt_set("train", 4, seed=2)[::-1][:20]
    good, bad = [], []
    for p in prompts:
        scene = scene_for_prompt(p, rng)
        good.append(render(scene))
        bad.append(render(Scene(scene.objects[1:], scene.background)))
    return prompts, good, bad


def test_correct_scene_has_higher_utility():
    o = Oracle(noise=0.0)
    right, wrong = render(Scene(RIGHT, BG)), render(Scene(WRONG_COLOUR, BG))
    assert o.utility(right, TEXT) > o.utility(wrong, TEXT) + 0.2  # one of four claims fails: −0.25
    assert o.utility(right, TEXT) == o.utility(right, parse_prompt(TEXT))
    fidelity_only = Oracle(quality_weight=0.0)
    assert fidelity_only.utility(right, TEXT) == 1.0 and fidelity_only.utility(wrong, TEXT) == 0.75
    assert Oracle(fidelity_weight=0.0).utility(render(Scene([], BG)), TEXT) == 0.0


def test_noise_free_oracle_prefers_correct_images(pairs):
    prompts, good, bad = pairs
    o = Oracle(noise=0.0)
    assert o.label_pairs(good, bad, prompts) == [1.0] * len(prompts)
    assert o.label_pairs(bad, good, prompts) == [0.0] * len(prompts)
    rate, lo, hi = o.win_rate(good, bad, prompts)
    assert rate == lo == hi == 1.0  # every resample is all wins
    assert o.win_rate(good, good, prompts)[0] == 0.5  # all ties


def test_identical_images_tie():
    img = render(Scene(RIGHT, BG))
    assert [Oracle(noise=0.5, seed=s).prefer(img, img, TEXT) for s in range(5)] == [0.5] * 5
    assert Oracle(tie_margin=0.02).label_from_utilities(0.80, 0.79) == 0.5


def test_noise_flips_the_stated_share_of_labels(pairs):
    n = 4000
    o = Oracle(noise=0.3, seed=0)
    labels = [o.label_from_utilities(1.0, 0.5) for _ in range(n)]
    flipped = labels.count(0.0) / n
    assert abs(flipped - 0.3) < 3 * math.sqrt(0.3 * 0.7 / n)
    prompts, good, bad = pairs  # the same through images
    labels = Oracle(noise=0.3, seed=1).label_pairs(good * 3, bad * 3, prompts * 3)
    assert 0.0 in labels and labels.count(0.0) / len(labels) < 0.55


def test_bradley_terry_temperature_softens_small_gaps():
    n = 4000
    o = Oracle(noise=0.0, temperature=0.02, tie_margin=0.0, seed=0)
    wins = sum(o.label_from_utilities(0.55, 0.50) for _ in range(n)) / n
    p = 1 / (1 + math.exp(-0.05 / 0.02))  # σ(2.5) = 0.924
    assert abs(wins - p) < 3 * math.sqrt(p * (1 - p) / n)
    hard = Oracle(noise=0.0, temperature=0.0, tie_margin=0.0, seed=0)
    assert all(hard.label_from_utilities(0.51, 0.50) == 1.0 for _ in range(100))


def test_labels_are_deterministic_given_the_seed():
    rng = random.Random(0)
    utilities = [(rng.random(), rng.random()) for _ in range(200)]

    def labels(seed):
        o = Oracle(noise=0.2, seed=seed)
        return [o.label_from_utilities(*u) for u in utilities]

    assert labels(7) == labels(7)
    assert labels(7) != labels(8)
    assert 0.5 in labels(7) and 0.0 in labels(7) and 1.0 in labels(7)


def test_quality_rewards_crisp_clean_sizeable_objects():
    crisp = render(Scene(RIGHT, BG))
    assert visual_quality(crisp) > 0.9
    assert visual_quality(crisp) > visual_quality(crisp.filter(ImageFilter.GaussianBlur(1.0))) + 0.03
    specks = np.asarray(crisp).copy()
    for x in range(4, 60, 8):
        specks[4:6, x:x + 2] = (30, 60, 220)
    assert visual_quality(crisp) > visual_quality(specks) + 0.05  # measured 0.966 vs 0.895
    small = render(Scene([ShapeObject("circle", "red", 16, 32, 7), ShapeObject("square", "blue", 48, 32, 7)], BG))
    assert visual_quality(crisp) > visual_quality(small) + 0.1
    assert visual_quality(render(Scene([], BG))) == 0.0
    o = Oracle(noise=0.0, temperature=0.0)
    assert o.prefer(crisp, crisp.filter(ImageFilter.GaussianBlur(1.0)), TEXT) == 1.0  # fidelity equal, quality decides


def test_win_rate_counts_ties_half_and_resamples_prompts(pairs):
    prompts, good, bad = pairs
    o = Oracle(noise=0.0)
    # 20 prompts: a wins on 10, ties on 6 (same image), loses on 4 → (10 + 3) / 20
    a = good[:10] + good[10:16] + bad[16:]
    b = bad[:10] + good[10:16] + good[16:]
    rate, lo, hi = o.win_rate(a, b, prompts)
    assert rate == pytest.approx(0.65)
    assert 0.4 < lo < 0.65 < hi < 0.9
    # each image twice under its prompt (two "seeds" with the same outcome): prompts are resampled, not
    # images, so the interval stays as wide instead of shrinking by √2
    rate_2, lo_2, hi_2 = o.win_rate(a + a, b + b, prompts + prompts)
    assert rate_2 == pytest.approx(0.65) and (hi_2 - lo_2) > 0.85 * (hi - lo)
    with pytest.raises(ValueError):
        Oracle().win_rate([1], [], [])


def test_jpeg_bytes():
    img = render(Scene(RIGHT, BG))
    data = to_jpeg_bytes(img, quality=90)
    assert data[:2] == b"\xff\xd8"
    back = Image.open(io.BytesIO(data))
    assert back.format == "JPEG" and back.size == img.size
    assert len(to_jpeg_bytes(img, quality=30)) < len(data)
