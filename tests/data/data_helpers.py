"""Small images and colour checks shared by the data tests."""

import io

from PIL import Image


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    """A solid-colour JPEG (``size`` is (width, height))."""
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


RED, BLUE, GREEN = (230, 20, 20), (20, 20, 230), (20, 200, 20)


def mean_color(img: Image.Image) -> tuple[float, float, float]:
    px = list(img.convert("RGB").getdata())
    return tuple(sum(p[c] for p in px) / len(px) for c in range(3))


def is_color(img: Image.Image, color) -> bool:
    return all(abs(a - b) < 12 for a, b in zip(mean_color(img), color))
