import torch

from data_helpers import BLUE, RED, jpeg
from diffalign.data import (DataStats, LatentCache, PreferenceDataset, collate_pairs, read_pickapic,
                            write_pickapic_parquet)
from diffalign.data.dataset import latent_key


def test_cache_second_pass_hits_and_survives_reopen(tmp_path):
    cache = LatentCache(tmp_path, "ns")
    x = torch.randn(3, 4, 8, 8)
    assert cache.get_latents(["a", "b", "c"]) == {} and cache.misses == 3
    cache.put_latents({k: x[i] for i, k in enumerate("abc")})  # views of one tensor
    got = cache.get_latents(["a", "b", "c", "d"])
    assert set(got) == {"a", "b", "c"} and cache.hits == 3 and cache.misses == 4
    torch.testing.assert_close(got["b"], x[1])
    cache.put_text({"a prompt": {"prompt_embeds": torch.ones(5, 8), "pooled_prompt_embeds": torch.zeros(8)}})

    again = LatentCache(tmp_path, "ns")
    torch.testing.assert_close(again.get_latents(["c"])["c"], x[2])
    text = again.get_text(["a prompt", "another"])
    assert set(text) == {"a prompt"} and set(text["a prompt"]) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert again.stats()["hits"] == 2 and again.stats()["misses"] == 1
    assert LatentCache(tmp_path, "other").get_latents(["a"]) == {}  # namespaces are separate
    assert not list(tmp_path.rglob("*.tmp"))


def test_cache_ignores_half_written_shards(tmp_path):
    cache = LatentCache(tmp_path, "ns")
    cache.put_latents({"a": torch.zeros(2)})
    (cache.dir / "shard-orphan.safetensors").write_bytes(b"truncated")  # no index file: never read
    (cache.dir / "shard-x.json").write_text('["latent:x"]')  # index without a shard: ignored
    reopened = LatentCache(tmp_path, "ns")
    assert len(reopened) == 1 and set(reopened.get_latents(["a"])) == {"a"}


def test_cache_bounded_memory_still_correct(tmp_path):
    cache = LatentCache(tmp_path, "ns", max_loaded_shards=2)
    for i in range(5):
        cache.put_latents({str(i): torch.full((2,), float(i))})
    reopened = LatentCache(tmp_path, "ns", max_loaded_shards=2)
    got = reopened.get_latents([str(i) for i in range(5)])
    assert [float(got[str(i)][0]) for i in range(5)] == [0, 1, 2, 3, 4] and len(reopened._loaded) == 2


def _rows():
    return [
        {"caption": "one", "jpg_0": jpeg(RED), "jpg_1": jpeg(BLUE), "label_0": 1},
        {"caption": "two", "jpg_0": jpeg(BLUE, (16, 32)), "jpg_1": jpeg(RED, (32, 16)), "label_0": 0},
        {"caption": "tie", "jpg_0": jpeg(BLUE), "jpg_1": jpeg(RED), "label_0": 0.5},
    ]


def test_dataset_collate_layout(tmp_path):
    path = write_pickapic_parquet(_rows(), tmp_path / "d.parquet")
    stats = DataStats()
    ds = PreferenceDataset(read_pickapic(path, stats=stats), 8, random_flip=True, seed=3, stats=stats)
    assert len(ds) == 2 and ds.stats.ties_dropped == 1
    batch = collate_pairs([ds[0], ds[1]])
    assert batch["pixels"].shape == (4, 3, 8, 8)
    assert batch["prompts"] == ["one", "two"] and batch["prompts_rejected"] is None
    red = torch.tensor([230, 20, 20]) / 127.5 - 1
    for row in (0, 1):  # winners (red) first, then losers
        assert torch.allclose(batch["pixels"][row].mean((1, 2)), red, atol=0.1)
    assert batch["original_sizes"].tolist() == [[16, 24], [16, 32], [16, 24], [32, 16]]
    assert batch["crops_top_left"].shape == (4, 2) and batch["weights"].tolist() == [1.0, 1.0]
    pair, w, l = ds[1]
    assert batch["keys"][1] == latent_key(pair.key, "chosen", w)
    assert batch["keys"][3] == latent_key(pair.key, "rejected", l)
    assert len(set(batch["keys"])) == 4
    # deterministic per (seed, epoch, index)
    assert torch.equal(ds[1][1].pixels, w.pixels)


def test_collate_dcpo_prompts(tmp_path):
    rows = [{"caption": "c0", "caption_1": "c1", "jpg_0": jpeg(RED), "jpg_1": jpeg(BLUE), "label_0": 1}, _rows()[0]]
    ds = PreferenceDataset(read_pickapic(write_pickapic_parquet(rows, tmp_path / "x.parquet")), 8)
    batch = collate_pairs([ds[0], ds[1]])
    assert batch["prompts"] == ["c0", "one"] and batch["prompts_rejected"] == ["c1", "one"]


def test_same_bytes_other_row_hits_cache(tmp_path):
    a = write_pickapic_parquet(_rows()[:1], tmp_path / "a.parquet")
    b = write_pickapic_parquet([_rows()[1], _rows()[0]], tmp_path / "b.parquet")
    cache = LatentCache(tmp_path / "cache", "ns")
    batch = collate_pairs([PreferenceDataset(read_pickapic(a), 8)[0]])
    cache.put_latents({k: torch.randn(4, 1, 1) for k in batch["keys"]})
    other = PreferenceDataset(read_pickapic(b), 8)
    assert other[1][0].source.endswith("row 1")
    keys = collate_pairs([other[1]])["keys"]
    assert keys == batch["keys"] and set(cache.get_latents(keys)) == set(keys)


def test_a_truncated_shard_is_a_miss_with_a_warning_naming_it_and_a_later_put_re_adds_it(tmp_path):
    import pytest

    from diffalign.data.pairs import content_key

    cache = LatentCache(tmp_path, "ns")
    cache.put_latents({"a": torch.ones(4, 2, 2), "b": torch.zeros(4, 2, 2)})
    cache.put_latents({"c": torch.full((4, 2, 2), 2.0)})  # another shard, left whole
    (shard,) = {cache.index["latent:" + content_key(k)] for k in ("a", "b")}
    path = cache.dir / shard
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by a full disk or a kill
    reopened = LatentCache(tmp_path, "ns")
    with pytest.warns(UserWarning, match=rf"latent cache: {path}.* is unreadable.*treated as misses"):
        got = reopened.get_latents(["a", "b", "c"])
    assert set(got) == {"c"} and reopened.misses == 2 and reopened.hits == 1
    assert not reopened.has_latent("a") and not reopened.has_latent("b")  # dropped from the index
    reopened.put_latents({"a": torch.full((4, 2, 2), 5.0)})  # encoded again: stored in a new shard
    torch.testing.assert_close(reopened.get_latents(["a"])["a"], torch.full((4, 2, 2), 5.0))
    assert reopened.get_latents(["b"]) == {}  # still a miss until it is put again
    assert not path.with_suffix(".json").exists()  # unindexed for good: a later opening never reads it
    for _ in range(3):  # whatever order the shards are indexed in
        later = LatentCache(tmp_path, "ns")
        assert set(later.get_latents(["a", "b", "c"])) == {"a", "c"}
