import json

import pytest

from data_helpers import BLUE, RED, is_color, jpeg
from diffalign.data import DataStats, read_feedback, read_jsonl_pairs
from diffalign.data.kto import feedback_from_pairs


def _jsonl(path, objs):
    path.write_text("\n".join(json.dumps(o) for o in objs) + "\n")
    return path


@pytest.fixture
def images(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "red.jpg").write_bytes(jpeg(RED))
    (tmp_path / "img" / "blue.jpg").write_bytes(jpeg(BLUE))
    (tmp_path / "img" / "broken.jpg").write_bytes(b"not an image")
    return tmp_path


def test_jsonl_pairs(images):
    path = _jsonl(images / "pairs.jsonl", [
        {"prompt": "p", "chosen": "img/red.jpg", "rejected": "img/blue.jpg"},
        {"prompt": "q", "chosen": "img/red.jpg", "rejected": "img/blue.jpg", "prompt_rejected": "q'", "weight": 0.5},
        {"prompt": "r", "chosen": "img/broken.jpg", "rejected": "img/blue.jpg"},
        {"prompt": "s", "chosen": "img/missing.jpg", "rejected": "img/blue.jpg"},
    ])
    stats = DataStats()
    pairs = list(read_jsonl_pairs(path, stats=stats))
    assert len(pairs) == 2 and (stats.rows, stats.kept, stats.bad_images) == (4, 2, 2)
    assert stats.bad_rows == [f"{path}:line 3", f"{path}:line 4"]
    assert is_color(pairs[0].chosen, RED) and is_color(pairs[0].rejected, BLUE)
    assert (pairs[1].prompt_rejected, pairs[1].weight) == ("q'", 0.5)
    assert pairs[0].key != pairs[1].key
    with pytest.raises(ValueError, match=r"pairs.jsonl:line 3: field 'chosen'"):
        list(read_jsonl_pairs(path, strict=True))
    moved = _jsonl(images / "elsewhere.jsonl", [{"prompt": "p", "chosen": "red.jpg", "rejected": "blue.jpg"}])
    (pair,) = read_jsonl_pairs(moved, image_root=images / "img")
    assert pair.key == pairs[0].key  # same bytes and prompt, another file: same content key


@pytest.mark.parametrize("obj,message", [
    ({"prompt": "p", "chosen": "img/red.jpg"}, "line 1: missing field 'rejected'"),
    ({"prompt": 3, "chosen": "img/red.jpg", "rejected": "img/blue.jpg"}, "line 1: field 'prompt'"),
    ({"prompt": "p", "chosen": "img/red.jpg", "rejected": "img/blue.jpg", "weight": "x"}, "line 1: field 'weight'"),
])
def test_jsonl_bad_rows_named(images, obj, message):
    with pytest.raises(ValueError, match=message):
        list(read_jsonl_pairs(_jsonl(images / "bad.jsonl", [obj])))


def test_jsonl_malformed_line(images):
    path = images / "broken.jsonl"
    path.write_text('{"prompt": "p"\n')
    with pytest.raises(ValueError, match="broken.jsonl:line 1: not valid JSON"):
        list(read_jsonl_pairs(path))


def test_feedback_labels(images):
    labels = [True, False, "like", "dislike", 1, 0, "Thumbs_Up", -1]
    path = _jsonl(images / "fb.jsonl", [{"prompt": f"p{i}", "image": "img/red.jpg", "label": v}
                                       for i, v in enumerate(labels)])
    stats = DataStats()
    samples = list(read_feedback(path, stats=stats))
    assert [s.desirable for s in samples] == [True, False, True, False, True, False, True, False]
    assert stats.labels == {"like": 4, "dislike": 4} and is_color(samples[0].image, RED)
    bad = _jsonl(images / "fb_bad.jsonl", [{"prompt": "p", "image": "img/red.jpg", "label": "meh"}])
    with pytest.raises(ValueError, match="fb_bad.jsonl:line 1: field 'label'"):
        list(read_feedback(bad))


def test_feedback_from_pairs(images):
    path = _jsonl(images / "pairs.jsonl", [
        {"prompt": "q", "chosen": "img/red.jpg", "rejected": "img/blue.jpg", "prompt_rejected": "q'"}])
    pairs = list(read_jsonl_pairs(path))
    for samples in (list(feedback_from_pairs(pairs)), list(read_feedback(pairs))):
        assert [(s.prompt, s.desirable) for s in samples] == [("q", True), ("q'", False)]
        assert is_color(samples[0].image, RED) and is_color(samples[1].image, BLUE)
