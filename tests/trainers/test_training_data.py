"""Training data holds images as file bytes and decodes only what a step encodes for the first time."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from structured_helpers import tiny_backbone

from diffalign.data.pairs import EncodedImage, PreferencePair
from diffalign.data.pickapic import write_pickapic_parquet
from diffalign.trainers.data import load_training_data
from diffalign.trainers.registry import recipe_from_dict


def _png(size, seed) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("data") / "sd")


@pytest.fixture
def recipe(tmp_path):
    rows = [{"caption": f"shape {i}", "jpg_0": _png((48, 32), i), "jpg_1": _png((32, 40), 100 + i), "label_0": 1.0}
            for i in range(6)]  # non-square, of two sizes: random crops and flips differ per image
    path = write_pickapic_parquet(rows, tmp_path / "pairs.parquet")
    return recipe_from_dict({"data": {"source": str(path), "resolution": 32, "center_crop": False,
                                      "random_flip": True},
                             "train": {"batch_size": 6, "output_dir": str(tmp_path / "run"), "seed": 3}})


def _count_decodes(monkeypatch) -> list:
    calls = []
    real = EncodedImage.decode
    monkeypatch.setattr(EncodedImage, "decode", lambda self: calls.append(1) or real(self))
    return calls


def test_batches_from_encoded_images_equal_batches_from_decoded_ones(backbone, recipe, tmp_path):
    data = load_training_data(recipe, "pairs", backbone, tmp_path)
    assert all(isinstance(im, EncodedImage) for i in range(6) for im in (data.item_at(i).chosen, data.item_at(i).rejected))
    encoded = data.batch(1, 0, 0, 1)
    make = data.examples.make
    data.examples.make = lambda r, where, row: (lambda p: PreferencePair(
        p.prompt, p.chosen.decode(), p.rejected.decode(), key=p.key))(make(r, where, row))
    data.cache = None
    decoded = data.batch(1, 0, 0, 1)
    torch.testing.assert_close(encoded.latents, decoded.latents)
    assert torch.equal(encoded.noise, decoded.noise) and torch.equal(encoded.timesteps, decoded.timesteps)
    assert encoded.prompts == decoded.prompts

    # and both are the VAE latents of prepare_pair's crops and flips, drawn from each example's generator
    from diffalign.core.positions import position_generator
    from diffalign.data.transforms import prepare_pair

    prepared = [prepare_pair(data.item_at(pos), 32, center_crop=False, random_flip=True,
                             generator=position_generator(3, "example", pos))
                for pos in data.positions(1, 0, 0, 1)]
    pixels = torch.stack([w.pixels for w, _ in prepared] + [l.pixels for _, l in prepared])
    assert any(w.flipped for w, _ in prepared) and any(not w.flipped for w, _ in prepared)
    torch.testing.assert_close(encoded.latents, backbone.encode_images(pixels, sample=False).float())


def test_a_step_whose_latents_are_cached_decodes_no_image(backbone, recipe, tmp_path, monkeypatch):
    data = load_training_data(recipe, "pairs", backbone, tmp_path)
    calls = _count_decodes(monkeypatch)
    first = data.batch(0, 0, 0, 1)
    assert len(calls) == 12  # 6 pairs, two images each
    again = data.batch(0, 0, 0, 1)  # the same examples, crops and flips: all in the cache
    assert len(calls) == 12
    torch.testing.assert_close(again.latents, first.latents)


def _pairs_with_bad_images(path, n: int, bad: int):
    """``n`` Pick-a-Pic rows whose first ``bad`` have undecodable bytes in jpg_1."""
    import io

    from PIL import Image

    from diffalign.data.pickapic import write_pickapic_parquet

    def png(shade: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (40, 40), (shade, 200 - shade, 90)).save(buf, format="PNG")
        return buf.getvalue()

    rows = [{"caption": f"a yellow disc {i}", "jpg_0": png(10 * i),
             "jpg_1": b"not an image" if i < bad else png(5 * i + 3), "label_0": 1.0} for i in range(n)]
    write_pickapic_parquet(rows, path)
    return path


def test_skipped_rows_are_met_when_read_reported_and_too_many_stop_the_run(tiny_models, tmp_path, capsys):
    from diffalign.cli import main

    def train(data, out):  # 8 steps of 2 pairs: one epoch, every row read
        return main(["train", "-", f"--model.pretrained={tiny_models['sd']}", f"--data.source={data}",
                     "--data.resolution=32", f"--train.output_dir={out}", "--train.max_steps=8",
                     "--train.batch_size=2", "--train.checkpointing_steps=0", "--model.lora_rank=4"])

    data = _pairs_with_bad_images(tmp_path / "two-bad.parquet", 16, 2)
    assert train(data, tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert f"data: {data}: 16 rows, read as the steps need them" in out  # nothing decoded before step 1
    end = out[out.index("data (end of run"):]
    assert "16 rows read, 14 kept, 0 ties dropped, 2 bad rows skipped (2 undecodable image)" in end
    assert f"skipped {data}:row 0: field 'jpg_1'" in end and f"skipped {data}:row 1:" in end
    assert (tmp_path / "run" / "final").is_dir()
    written = json.loads((tmp_path / "run" / "data_stats.json").read_text())  # and kept with the run
    assert (written["rows"], written["kept"], written["bad_images"]) == (16, 14, 2)
    assert written["skipped"] == {"undecodable image": 2}
    assert sorted(written["bad_rows"]) == [f"{data}:row 0", f"{data}:row 1"] and "jpg_1" in written["bad_reasons"][0]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 8 and metrics[-1]["data/skipped_undecodable_image"] == 2
    assert metrics[-1]["data/rows_read"] == 16 and metrics[-1]["data/kept"] == 14
    assert [m["data/rows_read"] for m in metrics] == sorted(m["data/rows_read"] for m in metrics)

    many = _pairs_with_bad_images(tmp_path / "five-bad.parquet", 16, 5)
    assert train(many, tmp_path / "run2") == 2
    err = capsys.readouterr().err
    assert "5 of the 16 rows read were skipped (5 undecodable image)" in err and "data.max_bad_fraction=0.2" in err
    assert not (tmp_path / "run2" / "final").exists()
