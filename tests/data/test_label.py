"""`diffalign data label` on the Shapes world: folders of scenes scored by the Shapes rewards."""

import csv
import json
import random

import numpy as np
import pytest
import torch

from diffalign.cli import main
from diffalign.data import read_pickapic
from diffalign.data.label import label, read_ranked
from diffalign.rewards import load_reward
from diffalign.shapes.grammar import parse_prompt, scene_for_prompt
from diffalign.shapes.scene import Scene, render

A, B, C = "a photo of a red square", "a photo of a blue circle", "a photo of three triangles"


def shapes_images():
    """``[(prompt, name, image)]``. A: partial (0.5), good (1.0), empty (0.0) under shapes-eval;
    B: two correct scenes (an eval tie); C: one image."""
    rng = random.Random(0)
    partial = scene_for_prompt(parse_prompt(A), rng)
    for obj in partial.objects:
        obj.color = "green"
    return [
        (A, "a_partial", render(partial)),
        (A, "a_good", render(scene_for_prompt(parse_prompt(A), rng))),
        (A, "a_empty", render(Scene([]))),
        (B, "b_good1", render(scene_for_prompt(parse_prompt(B), rng))),
        (B, "b_good2", render(scene_for_prompt(parse_prompt(B), rng))),
        (C, "c_only", render(scene_for_prompt(parse_prompt(C), rng))),
    ]


@pytest.fixture
def geneval_dir(tmp_path):
    """GenEval layout: NNNNN/metadata.jsonl + NNNNN/samples/NNNN.png."""
    root = tmp_path / "gen"
    by_prompt: dict[str, list] = {}
    for prompt, name, im in shapes_images():
        by_prompt.setdefault(prompt, []).append(im)
    for i, (prompt, ims) in enumerate(by_prompt.items()):
        (root / f"{i:05d}" / "samples").mkdir(parents=True)
        (root / f"{i:05d}" / "metadata.jsonl").write_text(json.dumps(parse_prompt(prompt).metadata()) + "\n")
        for j, im in enumerate(ims):
            im.save(root / f"{i:05d}" / "samples" / f"{j:04d}.png")
    return root


@pytest.fixture
def flat_dir(tmp_path):
    """A flat folder of PNGs and a CSV mapping file name -> prompt."""
    root = tmp_path / "flat"
    root.mkdir()
    with (tmp_path / "prompts.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "prompt"])
        for prompt, name, im in shapes_images():
            im.save(root / f"{name}.png")
            w.writerow([f"{name}.png", prompt])
    return root, tmp_path / "prompts.csv"


def pixels(im):
    return np.asarray(im.convert("RGB"))


def test_geneval_folder_to_best_vs_worst_pairs(geneval_dir, tmp_path, capsys):
    out = tmp_path / "pairs.parquet"
    assert main(["data", "label", str(geneval_dir), "--reward", "shapes-eval", "--out", str(out)]) == 0
    assert "1 pairs" in capsys.readouterr().out
    pairs = list(read_pickapic(out))
    images = {name: im for _, name, im in shapes_images()}
    assert len(pairs) == 1 and pairs[0].prompt == A  # B is a tie, C has one image
    assert np.array_equal(pixels(pairs[0].chosen), pixels(images["a_good"]))
    assert np.array_equal(pixels(pairs[0].rejected), pixels(images["a_empty"]))
    import pyarrow.parquet as pq

    row = pq.read_table(out).to_pylist()[0]
    assert row["jpg_0"] == (geneval_dir / "00000" / "samples" / "0001.png").read_bytes()  # bytes unchanged
    assert (row["label_0"], row["label_1"]) == (1.0, 0.0)


def test_margin_filter_drops_the_right_pairs(flat_dir, tmp_path):
    folder, prompts = flat_dir
    reward = {"shapes-eval": load_reward("shapes-eval")}

    def kept(min_margin, normalize):
        out = tmp_path / f"p_{min_margin}_{normalize}.parquet"
        stats = label(folder, reward, out, prompts=prompts, pairs="all", min_margin=min_margin, normalize=normalize)
        names = {pixels(im).tobytes(): n for _, n, im in shapes_images()}
        got = {(names[pixels(p.chosen).tobytes()], names[pixels(p.rejected).tobytes()]) for p in read_pickapic(out)}
        return got, stats

    # raw margins in A: good-partial 0.5, good-empty 1.0, partial-empty 0.5; B's pair is a tie
    got, stats = kept(0.75, "none")
    assert got == {("a_good", "a_empty")}
    assert (stats.pairs, stats.below_margin, stats.ties, stats.single_image_prompts) == (1, 2, 1, 1)
    got, _ = kept(0.5, "none")  # a margin equal to the threshold is kept
    assert got == {("a_good", "a_empty"), ("a_good", "a_partial"), ("a_partial", "a_empty")}
    # "dataset": margins in standard deviations of the reward over all six images (sample std)
    raw = torch.tensor([0.5, 1.0, 0.0, 1.0, 1.0, 1.0])
    assert load_reward("shapes-eval").score([im for _, _, im in shapes_images()], [p for p, _, _ in shapes_images()]) \
        .tolist() == raw.tolist()
    std = raw.std().item()
    got, _ = kept(0.75 / std, "dataset")
    assert got == {("a_good", "a_empty")}
    got, _ = kept(0.49 / std, "dataset")
    assert len(got) == 3


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_ranked_lists_average_normalised_rewards(flat_dir, tmp_path, suffix):
    folder, prompts = flat_dir
    names = ["shapes-eval", "shapes-oracle"]
    rewards = {n: load_reward(n) for n in names}
    out = tmp_path / f"ranked{suffix}"
    stats = label(folder, rewards, out, prompts=prompts, output="ranked")
    assert (stats.lists, stats.single_image_prompts) == (2, 1)
    lists = list(read_ranked(out))
    assert [r.caption for r in lists] == [A, B]
    # files are read in sorted name order: a_empty, a_good, a_partial, b_good1, b_good2, c_only
    order = sorted(shapes_images(), key=lambda t: t[1])
    ims, caps = [im for _, _, im in order], [p for p, _, _ in order]
    raw = {n: np.array(r.score(ims, caps).tolist(), dtype=np.float64) for n, r in rewards.items()}
    z = {n: (v - v.mean()) / v.std(ddof=1) for n, v in raw.items()}
    combined = (z["shapes-eval"] + z["shapes-oracle"]) / 2
    a = lists[0]
    assert a.names == ["a_empty.png", "a_good.png", "a_partial.png"]
    assert a.scores == pytest.approx(combined[:3].tolist(), abs=1e-5)
    assert a.ranking == [1, 2, 0]  # good, partial, empty
    assert a.rewards["shapes-oracle"] == pytest.approx(raw["shapes-oracle"][:3].tolist(), abs=1e-6)
    assert np.array_equal(pixels(a.images[1]), pixels(dict((n, im) for _, n, im in order)["a_good"]))
    b = lists[1]  # an eval tie, told apart by the oracle's quality term
    assert b.ranking == sorted(range(2), key=lambda k: -combined[3 + k])
    if suffix == ".jsonl":
        line = json.loads(out.read_text().splitlines()[0])
        assert line["images"][0] == "flat/a_empty.png"  # relative to the JSONL's folder
        assert set(line) == {"caption", "images", "names", "scores", "ranking", "rewards"}
    # a list whose spread is below the margin is dropped
    stats = label(folder, rewards, tmp_path / f"r2{suffix}", prompts=prompts, output="ranked",
                  min_margin=float(combined[3:5].max() - combined[3:5].min()) + 1e-3)
    assert (stats.lists, stats.below_margin) == (1, 1)


def test_bad_inputs_are_named_and_nothing_is_written(flat_dir, geneval_dir, tmp_path, capsys):
    folder, prompts = flat_dir
    out = tmp_path / "never.parquet"
    rows = prompts.read_text().splitlines()
    prompts.write_text("\n".join(r for r in rows if not r.startswith("b_good2")) + "\n")
    assert main(["data", "label", str(folder), "--prompts", str(prompts), "--reward", "shapes-eval",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "prompts.csv" in err and "no prompt for image 'b_good2.png'" in err
    assert main(["data", "label", str(folder), "--reward", "shapes-eval", "--out", str(out)]) == 1
    assert "needs --prompts" in capsys.readouterr().err
    (geneval_dir / "00001" / "metadata.jsonl").unlink()
    assert main(["data", "label", str(geneval_dir), "--reward", "shapes-eval", "--out", str(out)]) == 1
    assert "00001/metadata.jsonl: missing" in capsys.readouterr().err
    (geneval_dir / "00001" / "metadata.jsonl").write_text(json.dumps({"tag": "colors"}) + "\n")
    assert main(["data", "label", str(geneval_dir), "--reward", "shapes-eval", "--out", str(out)]) == 1
    assert "'prompt' field" in capsys.readouterr().err
    assert main(["data", "label", str(folder), "--prompts", str(prompts), "--reward", "shapes-eval",
                 "--combine-weight", "shapes-oracle=2", "--out", str(out)]) == 1
    assert "not given in --reward" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))
