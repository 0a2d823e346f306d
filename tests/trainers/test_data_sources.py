"""Training data at scale: rows read when a step needs them, from every source kind, by DataLoader workers
that give the same batches as the training process alone."""

import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from structured_helpers import tiny_backbone

from diffalign.data.pickapic import write_pickapic_parquet
from diffalign.trainers.data import load_training_data
from diffalign.trainers.registry import recipe_from_dict


def _png(size, seed) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _rows(n: int, *, bad=(), ties=()):
    return [{"caption": f"shape {i}", "jpg_0": _png((48, 32), i),
             "jpg_1": b"not an image" if i in bad else _png((32, 40), 100 + i),
             "label_0": 0.5 if i in ties else float(i % 3 != 0)} for i in range(n)]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("sources") / "sd")


def _recipe(source, tmp_path, **data):
    return recipe_from_dict({"data": {"source": source, "resolution": 32, **data},
                             "train": {"batch_size": 3, "gradient_accumulation_steps": 2,
                                       "output_dir": str(tmp_path / "run"), "seed": 5}})


def _batches(data, steps: int):
    data.start(0, steps, 0, 1)
    try:
        return [data.batch(s, m, 0, 1) for s in range(steps) for m in range(2)]
    finally:
        data.close()


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.latents, y.latents) and torch.equal(x.noise, y.noise)
        assert torch.equal(x.timesteps, y.timesteps) and torch.equal(x.x_t, y.x_t)
        assert x.prompts == y.prompts and torch.equal(x.weights, y.weights)


def test_zero_and_two_workers_give_the_same_batches(backbone, tmp_path):
    # random crops and flips, caption dropout, a tie and two undecodable rows: all drawn from the position
    path = write_pickapic_parquet(_rows(20, bad={4, 11}, ties={7}), tmp_path / "pairs.parquet", batch_rows=4)
    runs = {}
    for workers in (0, 2):
        recipe = _recipe(str(path), tmp_path / f"w{workers}", center_crop=False, random_flip=True,
                         caption_dropout=0.3, num_workers=workers)
        data = load_training_data(recipe, "pairs", backbone, tmp_path / f"w{workers}")
        runs[workers] = (_batches(data, 5), data.stats)  # 30 positions: past the first epoch of 20 rows
    _assert_same(runs[0][0], runs[2][0])
    for stats in (runs[0][1], runs[2][1]):
        assert (stats.rows, stats.ties_dropped, stats.bad_images) == (20, 1, 2)
        assert stats.skipped == {"undecodable image": 2}
    # and a run resumed at step 3 with workers reads what the unbroken run read there
    data = load_training_data(_recipe(str(path), tmp_path / "r", center_crop=False, random_flip=True,
                                      caption_dropout=0.3, num_workers=2), "pairs", backbone, tmp_path / "r")
    data.start(3, 5, 0, 1)
    resumed = [data.batch(s, m, 0, 1) for s in (3, 4) for m in range(2)]
    data.close()
    _assert_same(resumed, runs[0][0][6:])


def test_opening_a_parquet_set_reads_only_footers_and_an_epoch_reads_each_row_group_once(backbone, tmp_path,
                                                                                          monkeypatch):
    from diffalign.data import sources

    for k in range(3):  # 3 files of 8 rows in 4 row groups each: 12 groups, more than the 8 kept
        write_pickapic_parquet(_rows(24)[k::3], tmp_path / f"train-0000{k}-of-00003.parquet", batch_rows=2)
    reads = []
    real = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", lambda self, i, **kw: reads.append(i) or real(self, i, **kw))
    data = load_training_data(_recipe(str(tmp_path), tmp_path), "pairs", backbone, tmp_path)
    assert reads == [] and len(data) == 24 and data.examples.blocks() == [2] * 12
    assert sources.ROW_GROUPS_KEPT < 12
    seen = [data.examples.row_of(data.order(p)) for p in range(24)]
    assert sorted(seen) == list(range(24))  # an epoch is every row once
    for s in range(4):  # one epoch: 4 steps × 2 micro-batches × 3 pairs
        for m in range(2):
            data.batch(s, m, 0, 1)
    assert len(reads) == 12  # each row group read once


def _write_tar(path, rows):
    with tarfile.open(path, "w") as tar:
        for i, r in enumerate(rows):
            for name, data in ((f"{i:05d}.jpg_0", r["jpg_0"]), (f"{i:05d}.jpg_1", r["jpg_1"]),
                               (f"{i:05d}.json", json.dumps({"caption": r["caption"], "label_0": r["label_0"]}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _write_jsonl(folder, rows):
    folder.mkdir()
    lines = []
    for i, r in enumerate(rows):
        w, l = ("jpg_0", "jpg_1") if r["label_0"] == 1.0 else ("jpg_1", "jpg_0")
        (folder / f"{i}w.png").write_bytes(r[w])
        (folder / f"{i}l.png").write_bytes(r[l])
        lines.append(json.dumps({"prompt": r["caption"], "chosen": f"{i}w.png", "rejected": f"{i}l.png"}))
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "pairs.jsonl"


def test_every_source_kind_gives_the_same_batches(backbone, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [r for r in _rows(9) if r["label_0"] != 0.5]
    parquet = write_pickapic_parquet(rows, tmp_path / "pq" / "part-0.parquet")
    table = pq.read_table(parquet)
    saved = tmp_path / "saved"
    datasets.Dataset(table).save_to_disk(str(saved))
    sources = {
        "parquet glob": str(tmp_path / "pq" / "*.parquet"),
        "webdataset tar": str(_write_tar(tmp_path / "shard-000.tar", rows)),
        "save_to_disk folder": str(saved),
        "jsonl": str(_write_jsonl(tmp_path / "jsonl", rows)),
    }
    batches = {}
    for name, source in sources.items():
        fmt = {"format": "jsonl"} if name == "jsonl" else {}
        data = load_training_data(_recipe(source, tmp_path / name.replace(" ", "-"), **fmt), "pairs", backbone,
                                  tmp_path / name.replace(" ", "-"))
        assert len(data) == len(rows), name
        batches[name] = _batches(data, 2)
    # a datasets.Dataset object, from Python
    recipe = _recipe("unused", tmp_path / "object")
    recipe.data.source = datasets.load_from_disk(str(saved))
    batches["datasets.Dataset"] = _batches(load_training_data(recipe, "pairs", backbone, tmp_path / "object"), 2)
    first = batches.pop("parquet glob")
    for name, got in batches.items():
        _assert_same(first, got)


def test_a_save_to_disk_folder_trains_from_the_cli(tiny_models, tmp_path):
    datasets = pytest.importorskip("datasets")
    from diffalign.cli import main

    parquet = write_pickapic_parquet(_rows(6), tmp_path / "pairs.parquet")
    datasets.Dataset(pq.read_table(parquet)).save_to_disk(str(tmp_path / "saved"))
    out = tmp_path / "run"
    assert main(["train", "-", f"--model.pretrained={tiny_models['sd']}", f"--data.source={tmp_path / 'saved'}",
                 "--data.resolution=32", f"--train.output_dir={out}", "--train.max_steps=2", "--train.batch_size=2",
                 "--train.checkpointing_steps=0", "--model.lora_rank=4", "--data.num_workers=2"]) == 0
    assert (out / "final").is_dir()
    assert json.loads((out / "data_stats.json").read_text())["rows"] == 4


def test_strict_stops_at_the_first_bad_row_naming_file_row_and_field(backbone, tmp_path):
    path = write_pickapic_parquet(_rows(6, bad={0, 1, 2, 3, 4, 5}), tmp_path / "bad.parquet")
    data = load_training_data(_recipe(str(path), tmp_path, strict=True), "pairs", backbone, tmp_path)
    with pytest.raises(ValueError, match=r"bad\.parquet:row \d: field 'jpg_1': undecodable image"):
        data.batch(0, 0, 0, 1)


def test_a_jsonl_pair_whose_image_is_missing_is_a_counted_reported_skip(backbone, tmp_path, capsys):
    rows = [r for r in _rows(8) if r["label_0"] != 0.5]
    path = _write_jsonl(tmp_path / "jsonl", rows)
    (tmp_path / "jsonl" / "2l.png").unlink()
    data = load_training_data(_recipe(str(path), tmp_path, format="jsonl"), "pairs", backbone, tmp_path)
    _batches(data, 2)  # 12 positions over 8 rows: every row read
    assert (data.stats.rows, data.stats.kept, data.stats.bad_images) == (8, 7, 1)
    assert data.stats.skipped == {"missing image": 1}
    assert data.stats.bad_rows == [f"{path}:line 3"] and "2l.png" in data.stats.bad_reasons[0]
    data.report("end of run")
    assert f"skipped {path}:line 3: field 'rejected': cannot read" in capsys.readouterr().out
