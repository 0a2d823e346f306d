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


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header says ``width × height`` (8-bit grey) and whose pixel data is missing: what a
    header-only read sees of a huge image, at a few bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("size", [(9500, 9500), (20000, 20000)], ids=["past-pil-warning", "past-pil-error"])
def test_a_huge_image_is_a_size_error_from_its_header_not_a_pil_bomb_warning(size):
    import warnings

    from diffalign.data.pairs import MAX_IMAGE_PIXELS, ImageTooLarge

    data = _png_header(*size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would fail the test
        for read in (lambda: EncodedImage.from_bytes(data, "big.parquet:row 4", check=False),
                     lambda: EncodedImage.from_bytes(data, "big.parquet:row 4"),
                     lambda: decode_image(data, "big.parquet:row 4")):
            with pytest.raises(ImageTooLarge, match=r"^big\.parquet:row 4: image too large \(") as err:
                read()
            assert f"at most {MAX_IMAGE_PIXELS:,} pixels" in str(err.value) and f"{size[0] * size[1]:,}" in str(err.value)
    assert isinstance(err.value, ValueError)  # callers that catch a bad image catch this too


def test_diffalign_limit_is_checked_from_the_header(monkeypatch):
    from diffalign.data import pairs

    monkeypatch.setattr(pairs, "MAX_IMAGE_PIXELS", 40 * 24 - 1)
    with pytest.raises(pairs.ImageTooLarge, match=r"here: image too large \(40×24 = 960 pixels"):
        EncodedImage.from_bytes(_noise_png((40, 24)), "here", check=False)
    monkeypatch.setattr(pairs, "MAX_IMAGE_PIXELS", 40 * 24)
    assert EncodedImage.from_bytes(_noise_png((40, 24)), "here").size == (40, 24)


def test_a_huge_image_in_training_data_is_a_skip_counted_as_image_too_large(tmp_path):
    from diffalign.data.pairs import DataStats

    rows = [{"caption": f"c{i}", "jpg_0": _noise_png(seed=i), "jpg_1": jpeg(BLUE), "label_0": 1.0} for i in range(3)]
    rows[1]["jpg_1"] = _png_header(20000, 20000)
    path = write_pickapic_parquet(rows, tmp_path / "p.parquet")
    for decode in (True, False):
        stats = DataStats()
        assert len(list(read_pickapic(path, decode=decode, stats=stats))) == 2
        assert stats.skipped == {"image too large": 1} and stats.bad_rows == [f"{path}:row 1"]
        assert "field 'jpg_1': image too large" in stats.bad_reasons[0]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_transparent_images_are_composited_on_white():
    from diffalign.data.pairs import to_rgb
    from diffalign.data.transforms import prepare_image

    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # red, fully transparent
    rgba.putpixel((0, 0), (255, 0, 0, 255))  # one opaque red pixel
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black: mid grey on white
    la = Image.new("LA", (4, 4), (0, 0))
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    pal.info["transparency"] = 1
    for img in (rgba, la, pal):
        for out in (decode_image(_png(img), "x"), EncodedImage.from_bytes(_png(img), "x").decode(), to_rgb(img)):
            assert out.mode == "RGB" and out.getpixel((3, 3)) == (255, 255, 255), (img.mode, out.getpixel((3, 3)))
    got = decode_image(_png(rgba), "x")
    assert got.getpixel((0, 0)) == (255, 0, 0) and all(abs(c - 127) <= 1 for c in got.getpixel((1, 0)))
    pixels = prepare_image(rgba, 4).pixels  # a decoded RGBA image handed to training is composited too
    assert torch_allclose_white(pixels[:, 3, 3])
    opaque = Image.new("RGB", (4, 4), (10, 20, 30))
    assert to_rgb(opaque) is opaque and decode_image(_png(opaque), "x").getpixel((2, 2)) == (10, 20, 30)


def torch_allclose_white(values) -> bool:
    return bool(((values - 1.0).abs() < 1e-6).all())
