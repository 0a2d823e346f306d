import io
import random

import pytest
from PIL import Image, ImageDraw


def _image(rng: random.Random, size: int, good: bool) -> bytes:
    """Winners: a bright disc on a dark background; losers: noise-like stripes. JPEG bytes."""
    img = Image.new("RGB", (size + rng.randint(0, 16), size), (20, 20, 30) if good else (200, 190, 180))
    d = ImageDraw.Draw(img)
    if good:
        r = rng.randint(size // 5, size // 3)
        c = (rng.randint(r, size - r), rng.randint(r, size - r))
        d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=(250, 220, 40))
    else:
        for x in range(0, img.width, 3):
            d.line([(x, 0), (x, size)], fill=(rng.randint(0, 255), 0, rng.randint(0, 255)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="session")
def pair_parquet(tmp_path_factory):
    """12 Pick-a-Pic rows (winner = label_0 side), 2 ties, images of mixed original sizes."""
    from diffalign.data.pickapic import write_pickapic_parquet

    rng = random.Random(0)
    rows = []
    for i in range(14):
        good, bad = _image(rng, 40, True), _image(rng, 40, False)
        if i in (3, 9):
            rows.append({"caption": f"tie {i}", "jpg_0": good, "jpg_1": bad, "label_0": 0.5})
        elif i % 2:
            rows.append({"caption": f"a yellow disc {i}", "jpg_0": good, "jpg_1": bad, "label_0": 1.0})
        else:
            rows.append({"caption": f"a yellow disc {i}", "jpg_0": bad, "jpg_1": good, "label_0": 0.0})
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    write_pickapic_parquet(rows, path)
    return path


@pytest.fixture(scope="session")
def swapped_parquet(tmp_path_factory, pair_parquet):
    """The same pairs with every preference reversed."""
    import pyarrow.parquet as pq

    table = pq.read_table(pair_parquet)
    labels = [1.0 - v if v in (0.0, 1.0) else v for v in table.column("label_0").to_pylist()]
    import pyarrow as pa

    table = table.set_column(table.schema.get_field_index("label_0"), "label_0", pa.array(labels, pa.float64()))
    if "label_1" in table.column_names:
        table = table.set_column(table.schema.get_field_index("label_1"), "label_1",
                                 pa.array([1.0 - v for v in labels], pa.float64()))
    path = tmp_path_factory.mktemp("data") / "swapped.parquet"
    pq.write_table(table, path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from diffalign import testing

    root = tmp_path_factory.mktemp("models")
    return {
        "sd": testing.make_tiny_sd(root / "sd"),
        "sdxl": testing.make_tiny_sdxl(root / "sdxl"),
        "sd3": testing.make_tiny_sd3(root / "sd3"),
    }
