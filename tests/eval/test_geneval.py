"""GenEval rules on synthetic detections (hand-worked verdicts), scoring, colour classifier and detectors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from diffalign.eval.geneval import (COLORS, CLIPColorClassifier, Detection, GenEvalConfig, TransformersDetector,
                                    detections_from_post_processed, evaluate_geneval, geneval_score,
                                    relative_position, select_objects)
from diffalign.shapes.geneval import ShapesDetector

# real lines of GenEval's evaluation_metadata.jsonl
SINGLE = {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}
TWO = {"tag": "two_object", "include": [{"class": "bench", "count": 1}, {"class": "sports ball", "count": 1}],
       "prompt": "a photo of a bench and a sports ball"}
COUNTING = {"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}],
            "prompt": "a photo of two clocks"}
COLORS_ = {"tag": "colors", "include": [{"class": "fire hydrant", "count": 1, "color": "blue"}],
           "prompt": "a photo of a blue fire hydrant"}
POSITION = {"tag": "position", "include": [{"class": "teddy bear", "count": 1},
                                           {"class": "dog", "count": 1, "position": ["right of", 0]}],
            "prompt": "a photo of a dog right of a teddy bear"}
COLOR_ATTR = {"tag": "color_attr", "include": [{"class": "wine glass", "count": 1, "color": "purple"},
                                               {"class": "apple", "count": 1, "color": "black"}],
              "prompt": "a photo of a purple wine glass and a black apple"}


def det(label: str, score: float = 0.95, box=(0, 0, 20, 20), color: str | None = None) -> Detection:
    return Detection(label, score, tuple(float(v) for v in box), None, color)


def verdict(meta, dets, **kw) -> bool:
    return evaluate_geneval(meta, dets, **kw)[0]


def test_single_object_threshold():
    assert verdict(SINGLE, [det("bench", 0.31)])
    ok, reason = evaluate_geneval(SINGLE, [det("bench", 0.25)])
    assert not ok and reason == "expected bench>=1, found 0"
    assert not verdict(SINGLE, [det("bench", 0.3)])  # strictly over the threshold
    assert not verdict(SINGLE, [det("cow", 0.99)])
    assert verdict(SINGLE, [det("bench", 0.25)], config=GenEvalConfig(threshold=0.2))


def test_two_object():
    assert verdict(TWO, [det("bench", 0.5), det("sports ball", 0.4)])
    ok, reason = evaluate_geneval(TWO, [det("bench", 0.5), det("sports ball", 0.29)])
    assert not ok and reason == "expected sports ball>=1, found 0"
    assert verdict(TWO, [det("bench", 0.85), det("sports ball", 0.85)])  # 0.85 counts outside counting


def test_counting_threshold_and_exclusion():
    assert verdict(COUNTING, [det("clock"), det("clock")])
    assert verdict(COUNTING, [det("clock"), det("clock"), det("clock", 0.85)])  # the 0.85 one is ignored
    ok, reason = evaluate_geneval(COUNTING, [det("clock"), det("clock", 0.85)])
    assert not ok and reason == "expected clock>=2, found 1"
    ok, reason = evaluate_geneval(COUNTING, [det("clock")] * 3)  # three clocks for "two clocks"
    assert not ok and reason == "expected clock<3, found 3"
    assert verdict(COUNTING, [det("clock"), det("clock"), det("cat")])  # other classes do not matter


def test_max_objects_per_class():
    kept = select_objects([det("clock", 0.91 + i / 1000) for i in range(20)], "counting")
    assert len(kept["clock"]) == 16 and kept["clock"][0].score == pytest.approx(0.929)
    # so an exclusion above 16 can never trigger
    meta = {"tag": "counting", "include": [{"class": "clock", "count": 16}],
            "exclude": [{"class": "clock", "count": 17}]}
    assert verdict(meta, [det("clock")] * 20)


def test_nms_off_by_default_and_on_when_asked():
    same = [det("clock", 0.95, (0, 0, 20, 20)), det("clock", 0.94, (1, 1, 21, 21))]
    assert len(select_objects(same, "counting")["clock"]) == 2
    assert len(select_objects(same, "counting", GenEvalConfig(max_overlap=0.5))["clock"]) == 1


def test_colors_on_most_confident_objects():
    assert verdict(COLORS_, [det("fire hydrant", color="blue")])
    ok, reason = evaluate_geneval(COLORS_, [det("fire hydrant", color="red")])
    assert not ok and reason == "expected blue fire hydrant>=1, found 0 blue; and 1 red"
    # only the most confident hydrant is checked: a blue one behind a red one does not help
    assert not verdict(COLORS_, [det("fire hydrant", 0.6, color="blue"), det("fire hydrant", 0.9, color="red")])
    assert verdict(COLORS_, [det("fire hydrant", 0.9, color="blue"), det("fire hydrant", 0.6, color="red")])
    with pytest.raises(ValueError, match="color_classifier"):
        evaluate_geneval(COLORS_, [det("fire hydrant")])


def test_color_classifier_sees_top_count_objects_only():
    calls = []

    class ByPosition:
        def classify(self, image, detections, classname):
            calls.append((classname, [d.score for d in detections]))
            return ["blue" if d.box[0] < 50 else "red" for d in detections]

    image = Image.new("RGB", (100, 100))
    dets = [det("fire hydrant", 0.9, (0, 0, 20, 20)), det("fire hydrant", 0.8, (60, 0, 80, 20))]
    assert verdict(COLORS_, dets, image=image, color_classifier=ByPosition())
    assert calls == [("fire hydrant", [0.9])]
    with pytest.raises(ValueError, match="image"):
        evaluate_geneval(COLORS_, dets, color_classifier=ByPosition())


def test_color_attr():
    good = [det("wine glass", color="purple"), det("apple", color="black")]
    swapped = [det("wine glass", color="black"), det("apple", color="purple")]
    assert verdict(COLOR_ATTR, good)
    ok, reason = evaluate_geneval(COLOR_ATTR, swapped)
    assert not ok and len(reason.splitlines()) == 2  # both objects fail


def test_position():
    bear = det("teddy bear", box=(0, 0, 20, 20))  # centre (10, 10), 20 × 20
    assert verdict(POSITION, [bear, det("dog", box=(60, 0, 80, 20))])  # dx = (60 - 4) / 60 > 0.5
    ok, reason = evaluate_geneval(POSITION, [bear, det("dog", box=(-60, 0, -40, 20))])
    assert not ok and reason == "expected dog right of target, found left of target"
    # target missing: the dog has nothing to be right of
    ok, reason = evaluate_geneval(POSITION, [det("dog", box=(60, 0, 80, 20))])
    assert not ok and reason.splitlines() == ["expected teddy bear>=1, found 0", "no target for dog to be right of"]


def test_position_edge_cases():
    a = (0.0, 0.0, 20.0, 20.0)
    # 3 px to the right is within 0.1 × (20 + 20) = 4 px: no relation at all
    assert relative_position((3, 0, 23, 20), a) == set()
    # centre offset (20, 30): shrunk (16, 26) / |(20, 30)| = (0.44, 0.72): below but NOT right of
    assert relative_position((20, 30, 40, 50), a) == {"below"}
    # offset (20, 20): (16, 16) / 28.3 = (0.57, 0.57): both right of and below
    assert relative_position((20, 20, 40, 40), a) == {"right of", "below"}
    assert relative_position((0, -40, 20, -20), a) == {"above"}  # image y grows downwards
    bear = det("teddy bear", box=a)
    assert not verdict(POSITION, [bear, det("dog", box=(20, 30, 40, 50))])
    # every matched object must hold the relation: two dogs, one of them not right of the bear
    two = {**POSITION, "include": [POSITION["include"][0], {"class": "dog", "count": 2, "position": ["right of", 0]}]}
    assert verdict(two, [bear, det("dog", box=(60, 0, 80, 20)), det("dog", box=(90, 0, 110, 20))])
    assert not verdict(two, [bear, det("dog", box=(60, 0, 80, 20)), det("dog", 0.9, box=(-60, 0, -40, 20))])


def test_geneval_score_is_mean_of_task_means():
    results = [{"tag": "single_object", "prompt": "p1", "correct": True}] * 3 + \
              [{"tag": "single_object", "prompt": "p2", "correct": False}] + \
              [{"tag": "counting", "prompt": "p3", "correct": False}] * 2
    s = geneval_score(results)
    assert s["tasks"] == {"single_object": 0.75, "counting": 0.0}
    assert s["overall"] == pytest.approx(0.375)  # not the image mean 0.5
    assert s["correct_images"] == pytest.approx(0.5) and s["correct_prompts"] == pytest.approx(1 / 3)
    assert s["official"] is False and s["counts"] == {"single_object": 4, "counting": 2}
    with pytest.raises(ValueError):
        geneval_score([])


def tiny_clip():
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(embed_dim=16, quick_gelu=True,
                           vision_cfg=open_clip.model.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8,
                                                                    image_size=32),
                           text_cfg=open_clip.model.CLIPTextCfg(context_length=77, vocab_size=49408, width=32,
                                                                heads=2, layers=1))
    preprocess = open_clip.image_transform(32, is_train=False)
    return model, preprocess, open_clip.get_tokenizer("ViT-L-14-quickgelu")


def test_clip_color_classifier_runs_on_masked_crops():
    clf = CLIPColorClassifier(*tiny_clip())
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = np.zeros((64, 64), dtype=bool)
    mask[10:30, 10:30] = True
    dets = [Detection("apple", 0.9, (10, 10, 30, 30), mask), Detection("apple", 0.8, (30, 30, 60, 60))]
    crop = clf.crop(image, Detection("apple", 0.9, (0, 0, 40, 40), mask))
    assert crop.size == (40, 40)
    assert crop.getpixel((15, 15)) == (200, 30, 30) and crop.getpixel((35, 35)) == (153, 153, 153)  # #999 outside
    colors = clf.classify(image, dets, "apple")
    assert len(colors) == 2 and all(c in COLORS for c in colors)
    assert clf.text_classifier("apple").shape == (16, 10)
    assert torch.allclose(clf.text_classifier("apple").norm(dim=0), torch.ones(10))
    ok, _ = evaluate_geneval(COLOR_ATTR, [det("wine glass"), det("apple")], image=image, color_classifier=clf)
    assert isinstance(ok, bool)
    with pytest.raises(ValueError, match="mask shape"):
        clf.crop(image, Detection("apple", 0.9, (0, 0, 4, 4), np.zeros((4, 4), bool)))


def test_post_processed_detections_use_geneval_names():
    result = {"scores": torch.tensor([0.9, 0.4]), "labels": torch.tensor([74, 17]),
              "boxes": torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])}
    dets = detections_from_post_processed(result, {74: "mouse", 17: "cat"})
    assert [(d.label, d.score, d.box) for d in dets] == [("computer mouse", pytest.approx(0.9), (1.0, 2.0, 3.0, 4.0)),
                                                          ("cat", pytest.approx(0.4), (5.0, 6.0, 7.0, 8.0))]


def test_transformers_detector_tiny_random_detr():
    from transformers import ConditionalDetrConfig, ConditionalDetrForObjectDetection, ConditionalDetrImageProcessor

    torch.manual_seed(0)
    config = ConditionalDetrConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone=None,
        backbone_config={"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 8, 8, 8],
                         "depths": [1, 1, 1, 1],
                         "layer_type": "basic", "out_features": ["stage4"]},
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=5, num_labels=3,
        id2label={0: "cat", 1: "mouse", 2: "dog"}, label2id={"cat": 0, "mouse": 1, "dog": 2})
    model = ConditionalDetrForObjectDetection(config)
    processor = ConditionalDetrImageProcessor(size={"shortest_edge": 32, "longest_edge": 32})
    detector = TransformersDetector(model, processor, name="tiny")
    dets = detector.detect(Image.new("RGB", (48, 32), (10, 200, 10)))
    assert len(dets) == 5 * 3  # sigmoid head: top num_queries × num_labels candidates kept above 0
    for d in dets:
        assert d.label in {"cat", "computer mouse", "dog"} and 0 <= d.score <= 1
        assert -1 <= d.box[0] <= d.box[2] <= 49 and -1 <= d.box[1] <= d.box[3] <= 33
    record_ok, _ = evaluate_geneval(SINGLE, dets)
    assert record_ok is False


def test_shapes_detector_matches_shapes_eval():
    grammar = pytest.importorskip("diffalign.shapes.grammar")
    import random

    from diffalign.shapes.evaluate import evaluate as shapes_evaluate
    from diffalign.shapes.scene import render

    rng = random.Random(0)
    detector = ShapesDetector()
    for prompt in grammar.prompt_set("heldout", 3, seed=1):
        image = render(grammar.scene_for_prompt(prompt, rng))
        meta = prompt.metadata()
        ok, reason = evaluate_geneval(meta, detector.detect(image))
        assert ok == shapes_evaluate(image, prompt).correct, (meta, reason)
        assert ok, (meta["prompt"], reason)  # a clean render of the prompt's own scene is correct
        wrong = grammar.prompt_set("heldout", 1, seed=2)[0].metadata()
        assert evaluate_geneval(wrong, detector.detect(image))[0] == shapes_evaluate(
            image, grammar.ShapesPrompt.from_metadata(wrong)).correct


def test_every_real_geneval_line_accepts_its_own_scene_and_rejects_an_empty_one():
    from pathlib import Path

    from diffalign.eval.prompts import load_prompt_set

    bench = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"
    if not bench.is_dir():
        pytest.fail(f"benchmark copies not found at {bench}")
    step = {"left of": (-60, 0), "right of": (60, 0), "above": (0, -60), "below": (0, 60)}
    for item in load_prompt_set("geneval", path=bench):
        meta, dets, origins = item.metadata, [], []
        for req in meta["include"]:
            x, y = 200.0, 200.0
            if "position" in req:
                relation, target = req["position"]
                x, y = origins[target][0] + step[relation][0], origins[target][1] + step[relation][1]
            origins.append((x, y))
            for k in range(req["count"]):  # several objects of a class stack vertically, 1 px apart
                dets.append(det(req["class"], 0.95, (x, y + 21 * k, x + 20, y + 21 * k + 20), req.get("color")))
        if meta["tag"] == "position":  # keep stacked objects from breaking the relation: one each
            assert all(req["count"] == 1 for req in meta["include"])
        ok, reason = evaluate_geneval(meta, dets)
        assert ok, (meta["prompt"], reason)
        assert not evaluate_geneval(meta, [])[0]


def test_missing_weights_are_clear_errors(tmp_path):
    from diffalign.rewards.loading import MissingWeightsError

    with pytest.raises(MissingWeightsError, match="colour classifier"):
        CLIPColorClassifier.from_pretrained(tmp_path / "ViT-L-14.pt")
    with pytest.raises(OSError, match="huggingface-cli download"):
        TransformersDetector.from_pretrained(tmp_path / "no-detector")
