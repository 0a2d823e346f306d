import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from diffalign.data import DataStats, read_pickapic, write_pickapic_parquet
from diffalign.data import pickapic

from data_helpers import BLUE, GREEN, RED, is_color, jpeg


def _write_raw(path, columns: dict):
    pq.write_table(pa.table(columns), path)
    return path


def test_ties_dropped_counted_and_winner_first(tmp_path, rows):
    path = write_pickapic_parquet(rows, tmp_path / "p.parquet")
    assert pq.read_table(path).column("label_1").to_pylist() == [0.0, 1.0, 0.5]
    stats = DataStats()
    pairs = list(read_pickapic(path, stats=stats))
    assert (stats.rows, stats.kept, stats.ties_dropped, stats.bad_images) == (3, 2, 1, 0)
    assert stats.labels == {1.0: 1, 0.0: 1, 0.5: 1}
    for p in pairs:  # the swap put red first in both
        assert is_color(p.chosen, RED) and is_color(p.rejected, BLUE)
    assert pairs[1].source == f"{path}:row 1"
    kept = list(read_pickapic(path, drop_ties=False))
    assert len(kept) == 3 and is_color(kept[2].chosen, GREEN)


def test_directory_glob_and_list_sources(tmp_path, rows):
    write_pickapic_parquet(rows[:1], tmp_path / "a.parquet")
    write_pickapic_parquet(rows[1:2], tmp_path / "sub" / "b.parquet")
    assert len(list(read_pickapic(tmp_path))) == 2
    assert len(list(read_pickapic(str(tmp_path / "*.parquet")))) == 1
    assert len(list(read_pickapic([tmp_path / "a.parquet", tmp_path / "sub" / "b.parquet"]))) == 2
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        list(read_pickapic(tmp_path / "nope.parquet"))


def test_bad_label_names_file_row_and_field(tmp_path, rows):
    bad = [dict(r) for r in rows]
    bad[1]["label_0"] = 0.7
    path = _write_raw(tmp_path / "bad.parquet", {k: [r[k] for r in bad] for k in bad[0]})
    with pytest.raises(ValueError) as e:
        list(read_pickapic(path))
    assert str(path) in str(e.value) and "row 1" in str(e.value) and "label_0" in str(e.value)


def test_inconsistent_label_1(tmp_path, rows):
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    cols["label_1"] = [0.0, 0.0, 0.5]
    path = _write_raw(tmp_path / "l1.parquet", cols)
    with pytest.raises(ValueError, match=r"row 1: field 'label_1'"):
        list(read_pickapic(path))


def test_missing_column_named(tmp_path, rows):
    path = _write_raw(tmp_path / "nocap.parquet", {k: [r[k] for r in rows] for k in ("jpg_0", "jpg_1", "label_0")})
    with pytest.raises(ValueError) as e:
        list(read_pickapic(path))
    assert "'caption'" in str(e.value) and str(path) in str(e.value)


def test_corrupt_image_skipped_or_strict_error(tmp_path, rows):
    rows[0]["jpg_1"] = b"\xff\xd8\xff\xe0 definitely not a jpeg"
    path = write_pickapic_parquet(rows, tmp_path / "c.parquet")
    stats = DataStats()
    pairs = list(read_pickapic(path, stats=stats))
    assert len(pairs) == 1 and stats.bad_images == 1 and stats.bad_rows == [f"{path}:row 0"]
    with pytest.raises(ValueError) as e:
        list(read_pickapic(path, strict=True))
    assert f"{path}:row 0" in str(e.value) and "jpg_1" in str(e.value)


def test_keys_are_content_based(tmp_path, rows):
    a = write_pickapic_parquet(rows, tmp_path / "a.parquet")
    b = write_pickapic_parquet([rows[1], rows[0]], tmp_path / "b.parquet")
    ka = [p.key for p in read_pickapic(a)]
    kb = [p.key for p in read_pickapic(b)]
    assert ka[0] == kb[1] and ka[1] == kb[0] and ka[0] != ka[1]


def test_optional_columns_dcpo_caption_and_weight(tmp_path):
    rows = [{"caption": "cap 0", "caption_1": "cap 1", "jpg_0": jpeg(BLUE), "jpg_1": jpeg(RED), "label_0": 0,
             "weight": 2.0}]
    (p,) = read_pickapic(write_pickapic_parquet(rows, tmp_path / "d.parquet"))
    assert (p.prompt, p.prompt_rejected, p.weight) == ("cap 1", "cap 0", 2.0)
    assert is_color(p.chosen, RED)


def test_writer_leaves_nothing_on_failure(tmp_path, rows, monkeypatch):
    target = tmp_path / "out.parquet"

    def rows_then_boom():
        yield from rows
        raise RuntimeError("source died midway")

    with pytest.raises(RuntimeError):
        write_pickapic_parquet(rows_then_boom(), target, batch_rows=1)
    assert list(tmp_path.iterdir()) == []
    bad = [dict(r) for r in rows] + [{"caption": "x", "jpg_0": b"", "jpg_1": b"", "label_0": 3}]
    with pytest.raises(ValueError, match="row 3: field 'label_0'"):
        write_pickapic_parquet(bad, target, batch_rows=2)
    assert list(tmp_path.iterdir()) == []
    # an existing file is left untouched by a failed rewrite
    write_pickapic_parquet(rows, target)
    before = target.read_bytes()
    with pytest.raises(ValueError):
        write_pickapic_parquet(bad, target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def _tar(path, samples: dict[str, dict[str, bytes]]):
    with tarfile.open(path, "w") as tar:
        for key, files in samples.items():
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_tar(tmp_path):
    meta = lambda label, cap: json.dumps({"caption": cap, "label_0": label}).encode()  # noqa: E731
    path = _tar(tmp_path / "shard-000.tar", {
        "shard/000": {"jpg_0": jpeg(RED), "jpg_1": jpeg(BLUE), "json": meta(1, "first")},
        "shard/001": {"0.jpg": jpeg(BLUE), "1.jpg": jpeg(RED), "json": meta(0, "second")},
        "shard/002": {"jpg_0": jpeg(RED), "jpg_1": jpeg(BLUE), "json": meta(0.5, "tie")},
        "shard/003": {"jpg_0": jpeg(RED), "json": meta(1, "image 1 missing")},
    })
    stats = DataStats()
    pairs = list(read_pickapic(path, stats=stats))
    assert [p.prompt for p in pairs] == ["first", "second"]
    assert all(is_color(p.chosen, RED) and is_color(p.rejected, BLUE) for p in pairs)
    assert (stats.rows, stats.ties_dropped, stats.bad_images) == (4, 1, 1)
    assert "key shard/003" in stats.bad_rows[0]
    bad = _tar(tmp_path / "bad.tar", {"k": {"jpg_0": jpeg(RED), "jpg_1": jpeg(BLUE), "json": b'{"caption": "c"}'}})
    with pytest.raises(ValueError, match=r"bad.tar:row 0 \(key k\): missing field 'label_0'"):
        list(read_pickapic(bad))


def test_no_images_urls_fetched_once_and_cached(tmp_path, monkeypatch):
    served = {"http://x/red.jpg": jpeg(RED), "http://x/blue.jpg": jpeg(BLUE)}
    calls = []

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

    def urlopen(req, timeout):
        calls.append(req.full_url)
        if req.full_url not in served:
            raise OSError("HTTP Error 404")
        return Response(served[req.full_url])

    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    path = _write_raw(tmp_path / "noimg.parquet", {
        "caption": ["a", "b"], "label_0": [0.0, 1.0],
        "image_0_url": ["http://x/blue.jpg", "http://x/gone.jpg"],
        "image_1_url": ["http://x/red.jpg", "http://x/red.jpg"]})
    cache = tmp_path / "imgcache"
    for _ in range(2):
        stats = DataStats()
        pairs = list(read_pickapic(path, image_cache_dir=cache, stats=stats))
        assert len(pairs) == 1 and is_color(pairs[0].chosen, RED) and stats.bad_images == 1
    # blue and red fetched once; the missing one is retried (failures are not cached)
    assert calls.count("http://x/blue.jpg") == 1 and calls.count("http://x/red.jpg") == 1
    assert calls.count("http://x/gone.jpg") == 2
    assert len(list(cache.glob("*.img"))) == 2


def test_hub_id_without_datasets_package_is_clear(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(ImportError, match="pip install datasets"):
        list(read_pickapic("someone/some_pickapic_mirror"))


def test_hub_rows_via_fake_datasets(monkeypatch, rows):
    import sys
    import types

    seen = {}

    def load_dataset(name, split, streaming):
        seen.update(name=name, split=split, streaming=streaming)
        return iter(rows)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    stats = DataStats()
    pairs = list(read_pickapic("someone/mirror", split="validation", stats=stats))
    assert seen == {"name": "someone/mirror", "split": "validation", "streaming": True}
    assert len(pairs) == 2 and stats.ties_dropped == 1 and pairs[0].source == "someone/mirror[validation]:row 0"
    no_caption = [{k: v for k, v in r.items() if k != "caption"} for r in rows]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda *a, **k: iter(no_caption)))
    with pytest.raises(ValueError, match="someone/mirror.*'caption'"):
        list(read_pickapic("someone/mirror"))


def test_resolve_sources_hub_vs_path(tmp_path):
    assert pickapic.resolve_sources("yuvalkirstain/pickapic_v2") is None
    with pytest.raises(FileNotFoundError):
        pickapic.resolve_sources("missing/file.parquet")


def test_directory_in_hub_layout_reads_one_split(tmp_path, rows):
    data = tmp_path / "data"
    write_pickapic_parquet(rows[:2], data / "train-00000-of-00002-abc.parquet")
    write_pickapic_parquet(rows[:1], data / "train-00001-of-00002-def.parquet")
    write_pickapic_parquet(rows[:1], data / "validation_unique-00000-of-00001-x.parquet")
    assert len(list(read_pickapic(tmp_path))) == 3
    assert len(list(read_pickapic(tmp_path, split="validation_unique"))) == 1
    with pytest.raises(FileNotFoundError, match="split 'test'"):
        list(read_pickapic(tmp_path, split="test"))
    # shard names that merely contain a number are not split-tagged
    write_pickapic_parquet(rows[:1], tmp_path / "other" / "pickapic-000001.parquet")
    assert len(list(read_pickapic(tmp_path / "other"))) == 1
