"""Images kept as checked file bytes (``decode=False``): same pixels and keys as decoded reading."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from diffalign.data import read_feedback, read_jsonl_pairs, read_pickapic, write_pickapic_parquet
from diffalign.data.pairs import EncodedImage, decode_image

from data_helpers import BLUE, RED, jpeg


def _noise_png(size=(40, 24), seed=0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_encoded_image_knows_its_size_and_decodes_to_the_same_pixels():
    data = _noise_png((40, 24))
    img = EncodedImage.from_bytes(data, "here")
    assert (img.width, img.height, img.size) == (40, 24, (40, 24))
    assert np.array_equal(np.asarray(img.decode()), np.asarray(decode_image(data, "here")))
    assert img.data == data  # kept as given: memory is the file's size


@pytest.mark.parametrize("bad", [b"not an image", jpeg(RED, (64, 64))[:300]], ids=["garbage", "truncated-jpeg"])
def test_undecodable_bytes_fail_when_read_not_when_trained_on(bad):
    with pytest.raises(ValueError, match="row 3: undecodable image"):
        EncodedImage.from_bytes(bad, "row 3")


def test_pickapic_without_decoding_gives_the_same_pairs(tmp_path):
    rows = [{"caption": f"c{i}", "jpg_0": _noise_png(seed=i), "jpg_1": jpeg(BLUE), "label_0": float(i % 2)}
            for i in range(4)]
    rows.append({"caption": "bad", "jpg_0": b"junk", "jpg_1": jpeg(RED), "label_0": 1.0})
    path = write_pickapic_parquet(rows, tmp_path / "p.parquet")
    decoded, encoded = list(read_pickapic(path)), list(read_pickapic(path, decode=False))
    assert len(encoded) == 4  # the bad row is skipped at reading, as when decoding
    for d, e in zip(decoded, encoded):
        assert isinstance(e.chosen, EncodedImage) and isinstance(e.rejected, EncodedImage)
        assert (e.key, e.prompt, e.source) == (d.key, d.prompt, d.source)
        for a, b in ((d.chosen, e.chosen), (d.rejected, e.rejected)):
            assert np.array_equal(np.asarray(a), np.asarray(b.decode()))


def test_jsonl_pairs_and_feedback_without_decoding(tmp_path):
    (tmp_path / "r.jpg").write_bytes(jpeg(RED))
    (tmp_path / "b.jpg").write_bytes(jpeg(BLUE))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "p", "chosen": "r.jpg", "rejected": "b.jpg"}) + "\n")
    feedback = tmp_path / "fb.jsonl"
    feedback.write_text(json.dumps({"prompt": "p", "image": "r.jpg", "label": "like"}) + "\n")
    (pair,) = read_jsonl_pairs(pairs, decode=False)
    (sample,) = read_feedback(feedback, decode=False)
    assert isinstance(pair.chosen, EncodedImage) and pair.chosen.data == jpeg(RED)
    assert isinstance(sample.image, EncodedImage) and sample.image.size == (24, 16)
    assert pair.key == next(read_jsonl_pairs(pairs)).key
