"""Prompt-set parsers on the real benchmark files (counts as published), pins, cache and errors."""

from __future__ import annotations

import collections
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from diffalign.eval import prompts as P
from diffalign.eval.prompts import ChecksumError, RemoteFile, fetch_file, load_prompt_set

BENCHMARKS = Path(__file__).resolve().parents[2].parent / "shared" / "benchmarks"


@pytest.fixture(scope="module")
def bench() -> Path:
    if not BENCHMARKS.is_dir():
        pytest.fail(f"benchmark copies not found at {BENCHMARKS}: these tests need the shared/benchmarks folder "
                    "next to the repository")
    return BENCHMARKS


def categories(items) -> collections.Counter:
    return collections.Counter(i.category for i in items)


def test_geneval(bench):
    items = load_prompt_set("geneval", path=bench)
    assert len(items) == 553
    assert categories(items) == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94,
                                 "position": 100, "color_attr": 100}
    assert sum("exclude" in i.metadata for i in items) == 80
    first = items[0]
    assert first.text == "a photo of a bench" and first.metadata["include"] == [{"class": "bench", "count": 1}]
    assert all(i.text == i.metadata["prompt"] and i.category == i.metadata["tag"] for i in items)
    assert len(P.geneval_object_names(bench)) == 80


def test_t2i_compbench(bench):
    items = load_prompt_set("t2i-compbench", path=bench)
    assert categories(items) == {c: 300 for c in P.COMPBENCH_CATEGORIES}
    assert items[0].text == "a green bench and a blue bowl"
    # also from the folder of the files themselves
    assert [i.text for i in load_prompt_set("t2i-compbench", path=bench / "t2i_compbench")] == [i.text for i in items]


def test_partiprompts(bench):
    items = load_prompt_set("partiprompts", path=bench / "PartiPrompts.tsv")
    assert len(items) == 1632 and len({i.text for i in items}) == 1632
    cats = categories(items)
    assert len(cats) == 12 and cats["Animals"] == 314 and cats["Indoor Scenes"] == 40
    challenges = collections.Counter(i.metadata["Challenge"] for i in items)
    assert len(challenges) == 11 and challenges["Basic"] == 272 and challenges["Properties & Positioning"] == 35


def test_drawbench(bench):
    items = load_prompt_set("drawbench", path=bench)
    assert len(items) == 200
    cats = categories(items)
    assert len(cats) == 11 and cats["Reddit"] == 38 and cats["Rare Words"] == 7
    assert cats["Gary Marcus et al."] == 10  # upstream has a trailing space in this name


def test_hpdv2(bench):
    items = load_prompt_set("hpdv2", path=bench)
    assert categories(items) == {s: 800 for s in P.HPDV2_STYLES}
    anime = [i for i in items if i.category == "anime"]
    assert len({i.text for i in anime}) == 781  # duplicates kept: the benchmark scores all 800
    assert [i.metadata["index"] for i in anime] == list(range(800))


def test_small_sets(bench):
    ir = load_prompt_set("imagereward", path=bench)
    assert len(ir) == 100 and ir[0].metadata["id"] == "005695-0057"
    animals = load_prompt_set("ddpo-simple-animals", path=bench)
    assert len(animals) == 45 and animals[0].text == "cat"


def test_checksum_mismatch_names_file_and_both_hashes(bench, tmp_path):
    copy = tmp_path / "PartiPrompts.tsv"
    copy.write_bytes((bench / "PartiPrompts.tsv").read_bytes() + b"extra\tAnimals\tBasic\t\n")
    with pytest.raises(ChecksumError) as err:
        load_prompt_set("partiprompts", path=copy)
    msg = str(err.value)
    assert str(copy) in msg and P.FILES["partiprompts"].sha256 in msg and P.sha256_of(copy.read_bytes()) in msg
    assert len(load_prompt_set("partiprompts", path=copy, verify=False)) == 1633


def test_upstream_names_in_a_folder(bench, tmp_path):
    shutil.copy(bench / "DrawBench_Prompts.csv", tmp_path / "DrawBench Prompts.csv")
    assert len(load_prompt_set("drawbench", path=tmp_path)) == 200
    with pytest.raises(FileNotFoundError, match="evaluation_metadata.jsonl"):
        load_prompt_set("geneval", path=tmp_path)


def test_pins_are_commit_urls():
    for key, remote in P.FILES.items():
        assert remote.url.startswith("https://raw.githubusercontent.com/"), key
        assert len(remote.url.split("/")[5]) == 40, f"{key}: not pinned to a commit"
        assert len(remote.sha256) == 64


def test_fetch_file_verifies_and_caches(bench, tmp_path):
    src = bench / "ddpo_simple_animals.txt"
    good = RemoteFile("sub/animals.txt", src.as_uri(), P.sha256_of(src.read_bytes()))
    path = fetch_file(good, tmp_path)
    assert path == tmp_path / "sub" / "animals.txt" and path.read_bytes() == src.read_bytes()
    path.write_text("corrupt")  # a corrupt cached copy is downloaded again
    assert fetch_file(good, tmp_path).read_bytes() == src.read_bytes()
    bad = RemoteFile("bad.txt", src.as_uri(), "0" * 64)
    with pytest.raises(ChecksumError, match="0" * 64):
        fetch_file(bad, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]  # nothing half-written
    missing = RemoteFile("gone.txt", (tmp_path / "gone.txt").as_uri(), "0" * 64)
    with pytest.raises(ConnectionError, match="pass path="):
        fetch_file(missing, tmp_path)


def test_unknown_set():
    with pytest.raises(KeyError, match="geneval"):
        load_prompt_set("genevel")


def test_pickapic_local_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"caption": ["a cat", "a dog", "a cat", ""]}),
                   tmp_path / "test_unique-00000-of-00001.parquet")
    pq.write_table(pa.table({"caption": ["other split"]}), tmp_path / "validation_unique-00000-of-00001.parquet")
    items = load_prompt_set("pickapic-test", path=tmp_path)
    assert [i.text for i in items] == ["a cat", "a dog"]
    val = load_prompt_set("pickapic-test", path=tmp_path, split="validation_unique")
    assert [i.text for i in val] == ["other split"]


def test_pickapic_without_datasets_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(ImportError, match="datasets"):
        load_prompt_set("pickapic-test")


@pytest.mark.skipif(importlib.util.find_spec("diffalign.shapes.grammar") is None, reason="no Shapes grammar")
def test_shapes():
    items = load_prompt_set("shapes", n_per_task=4)
    assert categories(items) == {t: 4 for t in ("single_object", "two_object", "counting", "colors", "position",
                                                "color_attr")}
    assert all(i.metadata["prompt"] == i.text and i.metadata["tag"] == i.category for i in items)
    assert [i.text for i in load_prompt_set("shapes", n_per_task=4)] == [i.text for i in items]
