"""`diffalign score`: folders and parquet files in, one row per image out."""

import csv
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffalign.cli import main
from diffalign.rewards import load_reward
from tests.rewards.conftest import smooth_images


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, im in enumerate(smooth_images(3, (40, 40))):
        im.save(folder / f"img_{i}.png")
    return folder


def test_score_folder_with_two_rewards_to_csv(image_dir, tmp_path, tiny_hf_clip):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\ntwo blue squares\na cat\n")
    out = tmp_path / "scores.csv"
    rc = main(["score", "--reward", "jpeg-incompressibility,pickscore", "--images", str(image_dir),
               "--prompts", str(prompts), "--out", str(out), "--reward-weights", f"pickscore={tiny_hf_clip}",
               "--batch-size", "2"])
    assert rc == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["image"] for r in rows] == ["img_0.png", "img_1.png", "img_2.png"]
    assert [r["prompt"] for r in rows] == ["a red circle", "two blue squares", "a cat"]
    from PIL import Image

    images = [Image.open(image_dir / r["image"]).convert("RGB") for r in rows]
    expected = load_reward("pickscore", weights=str(tiny_hf_clip)).score(images, [r["prompt"] for r in rows])
    assert [float(r["pickscore"]) for r in rows] == pytest.approx(expected.tolist(), abs=1e-5)
    assert all(float(r["jpeg-incompressibility"]) > 0 for r in rows)


def test_json_mapping_prompts_and_json_output(image_dir, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"img_0": "x", "img_1.png": "y", "img_2": "z"}))
    out = tmp_path / "scores.json"
    assert main(["score", "--reward", "jpeg-compressibility", "--images", str(image_dir),
                 "--prompts", str(prompts), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["prompt"] for r in rows] == ["x", "y", "z"] and all(r["jpeg-compressibility"] < 0 for r in rows)


def test_pickapic_parquet(tmp_path):
    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    ims = smooth_images(4, (32, 32))
    table = pa.table({"caption": ["p0", "p1"], "jpg_0": [png(ims[0]), png(ims[2])], "jpg_1": [png(ims[1]), png(ims[3])]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    out = tmp_path / "s.csv"
    assert main(["score", "--reward", "jpeg-compressibility", "--images", str(tmp_path / "pairs.parquet"),
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["image"], r["prompt"]) for r in rows] == [("0_0", "p0"), ("0_1", "p0"), ("1_0", "p1"), ("1_1", "p1")]


def test_bad_inputs_are_named_and_nothing_is_written(image_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("only one\n")
    out = tmp_path / "scores.csv"
    assert main(["score", "--reward", "jpeg-compressibility", "--images", str(image_dir),
                 "--prompts", str(prompts), "--out", str(out)]) == 2
    assert "1 prompt lines for 3 images" in capsys.readouterr().err and not out.exists()
    assert main(["score", "--reward", "nope", "--images", str(image_dir), "--prompts", str(prompts)]) == 2
    assert "unknown reward" in capsys.readouterr().err


def test_list_names_every_registered_reward_with_its_cards_score(capsys):
    from diffalign.rewards.registry import get_card, list_rewards

    assert main(["score", "--list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(list_rewards())
    assert "fraction of the caption's claims that hold" in lines["shapes-eval"]
    assert all(("no card" in lines[n]) == (get_card(n) is None) for n in lines)
    assert main(["score"]) == 2  # neither --list nor --reward
    assert "--reward is required (--list names them)" in capsys.readouterr().err
