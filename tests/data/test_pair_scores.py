"""Per-image reward scores on preference pairs (SmPO): Pick-a-Pic score_0/score_1, JSONL
score_chosen/score_rejected, and the scores 'diffalign data label' writes."""

import json

import pytest
from data_helpers import BLUE, RED, is_color, jpeg

from diffalign.data.jsonl import read_jsonl_pairs
from diffalign.data.pickapic import read_pickapic, write_pickapic_parquet


def test_pickapic_scores_follow_their_images(tmp_path):
    rows = [{"caption": "a", "jpg_0": jpeg(RED), "jpg_1": jpeg(BLUE), "label_0": 1.0, "score_0": 0.9, "score_1": 0.2},
            {"caption": "b", "jpg_0": jpeg(RED), "jpg_1": jpeg(BLUE), "label_0": 0.0, "score_0": 0.9, "score_1": 0.2}]
    path = write_pickapic_parquet(rows, tmp_path / "p.parquet")
    a, b = list(read_pickapic(path))
    assert is_color(a.chosen, RED) and a.scores == (0.9, 0.2)
    assert is_color(b.chosen, BLUE) and b.scores == (0.2, 0.9)  # swapped with the images
    plain = write_pickapic_parquet([{k: v for k, v in rows[0].items() if not k.startswith("score")}],
                                   tmp_path / "plain.parquet")
    assert next(iter(read_pickapic(plain))).scores is None


def test_pickapic_half_given_scores_is_an_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"caption": ["a"], "jpg_0": [jpeg(RED)], "jpg_1": [jpeg(BLUE)], "label_0": [1.0],
                      "score_0": [0.5], "score_1": pa.array([None], pa.float64())})
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"row 0: field 'score_1'"):
        list(read_pickapic(tmp_path / "bad.parquet"))


def test_jsonl_scores(tmp_path):
    (tmp_path / "r.jpg").write_bytes(jpeg(RED))
    (tmp_path / "b.jpg").write_bytes(jpeg(BLUE))
    lines = [{"prompt": "a", "chosen": "r.jpg", "rejected": "b.jpg", "score_chosen": 1.5, "score_rejected": -0.5},
             {"prompt": "b", "chosen": "r.jpg", "rejected": "b.jpg"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    a, b = list(read_jsonl_pairs(tmp_path / "p.jsonl"))
    assert a.scores == (1.5, -0.5) and b.scores is None
    (tmp_path / "bad.jsonl").write_text(json.dumps({**lines[0], "score_rejected": "high"}) + "\n")
    with pytest.raises(ValueError, match="line 1: field 'score_rejected'"):
        list(read_jsonl_pairs(tmp_path / "bad.jsonl"))


def test_label_writes_the_combined_scores(tmp_path):
    """'diffalign data label' pairs carry each image's combined score, winner's first."""
    import torch

    from diffalign.data.label import label

    class Brightness:
        card = None

        def score(self, images, prompts):
            return torch.tensor([float(sum(im.convert("L").getdata())) / (im.width * im.height) for im in images])

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, c in enumerate([(40, 40, 40), (200, 200, 200), (120, 120, 120)]):
        (folder / f"{i}.png").write_bytes(jpeg(c))
    (tmp_path / "prompts.txt").write_text("a\na\na\n")
    label(folder, {"brightness": Brightness()}, tmp_path / "pairs.parquet", prompts=tmp_path / "prompts.txt")
    (pair,) = list(read_pickapic(tmp_path / "pairs.parquet"))
    assert pair.scores is not None and pair.scores[0] > pair.scores[1]
    assert pair.scores[0] == pytest.approx(-pair.scores[1], abs=1e-6)  # z-scores of 200 and 40 around 120
