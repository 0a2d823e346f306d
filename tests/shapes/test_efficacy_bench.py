"""`diffalign shapes efficacy`: the statistics by hand, the control's data, and the command on a few
images and steps (resumes without training again, says which methods are missing)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffalign.errors import UsageError
from diffalign.eval.compare import paired_comparison
from diffalign.shapes import efficacy
from diffalign.shapes.demo import BUNDLED_CANDIDATES, Candidates


def test_win_indicators_count_a_tie_within_the_margin_as_half():
    w = efficacy.win_indicators([0.5, 0.5, 0.5, 0.5], [0.2, 0.49, 0.8, 0.5], tie_margin=0.02)
    assert w.tolist() == [1.0, 0.5, 0.0, 0.5]


def test_one_seed_gives_the_rate_of_the_paired_comparison():
    rng = np.random.default_rng(0)
    wins = rng.integers(0, 3, size=40) / 2
    groups = [i // 2 for i in range(40)]
    rate, lo, hi = efficacy.pooled_win_rate(wins[None], groups)
    ref = paired_comparison(wins, np.full(40, 0.5), groups=groups)  # a − b has the sign of win − ½
    assert rate == pytest.approx(ref["win_rate"])
    assert lo <= rate <= hi
    assert lo == pytest.approx(ref["win_rate_ci95"][0], abs=0.06) and hi == pytest.approx(ref["win_rate_ci95"][1],
                                                                                         abs=0.06)


def test_seeds_that_disagree_widen_the_pooled_interval_to_both_of_them():
    # seed 0 wins every image, seed 1 none: a quarter of the draws take seed 0 twice (rate 1), a quarter
    # seed 1 twice (rate 0), so the 95 % interval is exactly [0, 1] around the pooled 0.5
    wins = np.stack([np.ones(30), np.zeros(30)])
    assert efficacy.pooled_win_rate(wins, list(range(30))) == (0.5, 0.0, 1.0)
    # the same images at two agreeing seeds: the interval is the prompts' alone, well above 0.5
    agree = np.stack([np.r_[np.ones(24), np.zeros(6)]] * 2)
    rate, lo, hi = efficacy.pooled_win_rate(agree, list(range(30)))
    assert rate == pytest.approx(0.8) and 0.6 < lo < rate < hi <= 0.95


def test_pooled_win_rate_refuses_wins_that_do_not_match_the_prompts():
    with pytest.raises(ValueError, match=r"wins must be \[seeds, 3\]"):
        efficacy.pooled_win_rate(np.ones((2, 4)), [0, 1, 2])


def test_the_control_data_flips_every_label_and_score(tmp_path):
    candidates = Candidates.load(BUNDLED_CANDIDATES)
    candidates = Candidates(candidates.prompts[:12], candidates.images[:12], candidates.utilities[:12])
    tables = {flip: pq.read_table(efficacy.write_training_data("scored", tmp_path / f"{flip}.parquet", candidates,
                                                               flip=flip)).to_pylist() for flip in (False, True)}
    assert [r["label_0"] for r in tables[True]] == [1.0 - r["label_0"] for r in tables[False]]
    for plain, flipped in zip(tables[False], tables[True]):
        assert flipped["score_0"] == pytest.approx(1.0 - plain["score_0"])
        assert flipped["jpg_0"] == plain["jpg_0"]  # the same images, labelled the other way
    with pytest.raises(ValueError, match="no training data of kind 'none'"):
        efficacy.write_training_data("none", tmp_path / "x", candidates, flip=False)


def test_dcpo_data_captions_the_loser_with_a_perturbed_prompt_in_both_arms(tmp_path):
    from diffalign.data.pickapic import read_pickapic

    candidates = Candidates.load(BUNDLED_CANDIDATES)
    candidates = Candidates(candidates.prompts[:12], candidates.images[:12], candidates.utilities[:12])
    prompts = [p.text for p in candidates.prompts]
    for flip in (False, True):
        path = efficacy.write_training_data("dual-caption", tmp_path / f"{flip}.parquet", candidates, flip=flip)
        pairs = efficacy.oracle_pairs(candidates, flip=flip)
        rows = [r for r, pair in zip(pq.read_table(path).to_pylist(), pairs) if pair["label_0"] != 0.5]
        assert len(rows) >= 8
        for row, prompt in zip(rows, prompts):
            winner, loser = ("caption", "caption_1") if row["label_0"] == 1.0 else ("caption_1", "caption")
            assert row[winner] == prompt and row[loser] != prompt  # one colour, count, shape or relation changed
        # as DCPO reads it: the winner first, conditioned on its own caption; the loser on the perturbed one
        read = list(read_pickapic(path))
        assert len(read) == len(rows)
        assert all(r.prompt in prompts and r.prompt_rejected not in (None, r.prompt) for r in read)
    # the flipped arm's loser is the labelled arm's winner image, now under the perturbed caption
    plain = pq.read_table(tmp_path / "False.parquet").to_pylist()
    flipped = pq.read_table(tmp_path / "True.parquet").to_pylist()
    for a, b in zip(plain, flipped):
        if a["label_0"] == 1.0:
            assert b["label_0"] == 0.0 and b["caption_1"] == a["caption"] and b["jpg_0"] == a["jpg_0"]


def test_the_command_trains_both_arms_resumes_without_training_and_names_what_is_missing(tmp_path, monkeypatch,
                                                                                       capsys):
    out = tmp_path / "bench"
    args = ["--seeds", "0", "--eval-per-task", "1", "--out", str(out), "train.max_steps=1"]
    assert efficacy.main(["--methods", "diffusion-dpo", *args]) == 0
    runs = {arm: json.loads((out / "runs" / "diffusion-dpo" / f"seed0-{arm}.json").read_text())
            for arm in efficacy.ARMS}
    assert all(len(r["utility"]) == len(r["correct"]) == 12 for r in runs.values())
    assert runs["labels"]["overrides"] == ["train.max_steps=1"]
    assert not (out / "runs" / "diffusion-dpo" / "seed0-labels").exists()  # data and LoRA removed
    table = json.loads((out / "table.json").read_text())
    (row,) = table["methods"]
    assert row["method"] == "diffusion-dpo" and set(row["pooled"]) >= {"aligned_over_base", "control_over_base"}
    assert "Every run with: train.max_steps=1." in (out / "table.md").read_text()

    def no_training(*a, **k):
        raise AssertionError("a run whose file exists was trained again")

    monkeypatch.setattr(efficacy, "train_run", no_training)
    capsys.readouterr()
    assert efficacy.main(["--methods", "diffusion-dpo,sft", "--table-only", *args]) == 3
    printed = capsys.readouterr().out
    assert "| diffusion-dpo" in printed and "- sft: not measured in this run" in printed
    assert efficacy.main(["--methods", "diffusion-dpo", *args]) == 0  # resumed: nothing to train
    # a method whose run fails is reported and skipped; the table still comes from the others
    assert efficacy.main(["--methods", "sft,diffusion-dpo", *args]) == 3
    captured = capsys.readouterr()
    assert "efficacy: sft seed 0 labels FAILED (AssertionError" in captured.err and "| diffusion-dpo" in captured.out


def test_an_unknown_method_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="unknown method.*dpo-typo"):
        efficacy.main(["--methods", "dpo-typo", "--out", str(tmp_path)])


def test_the_rewriter_row_trains_sft_once_a_seed_and_its_control_on_swapped_pairs(tmp_path, monkeypatch):
    import functools

    from diffalign.text import pairs as text_pairs
    from diffalign.text import rewriter as text_rewriter
    from diffalign.text import shapes as text_shapes

    small = functools.partial(text_shapes.ShapesRewriterConfig, train_per_task=2, sft_steps=20, dpo_steps=2,
                              pairs=text_pairs.PairConfig(
                                  num_candidates=3, images_per_candidate=1, rewards={"shapes-eval": 1.0},
                                  num_inference_steps=4, sampling=text_rewriter.RewriteConfig(
                                      do_sample=True, temperature=1.0, max_new_tokens=16)))
    monkeypatch.setattr(text_shapes, "ShapesRewriterConfig", small)
    stages = []
    real_stage = text_shapes.train_sft_and_pairs
    monkeypatch.setattr(text_shapes, "train_sft_and_pairs", lambda *a, **k: stages.append(1) or real_stage(*a, **k))
    out = tmp_path / "bench"
    assert efficacy.main(["--methods", "rewriter", "--seeds", "0", "--eval-per-task", "1", "--out", str(out)]) == 0
    assert len(stages) == 1  # SFT and its pairs: once for both arms
    shared = out / "runs" / "rewriter" / "seed0-sft"
    rows = [json.loads(x) for x in (shared / "pairs.jsonl").read_text().splitlines()]
    swapped = [json.loads(x) for x in (shared / "pairs-swapped.jsonl").read_text().splitlines()]
    assert rows and [(r["chosen"], r["rejected"]) for r in rows] == [(s["rejected"], s["chosen"]) for s in swapped]
    base = json.loads((out / "base.json").read_text())
    for arm in efficacy.ARMS:
        run = json.loads((out / "runs" / "rewriter" / f"seed0-{arm}.json").read_text())
        assert len(run["utility"]) == len(run["correct"]) == len(run["rewrites"]) == len(base["utility"]) == 12
        assert run["pairs"]["pairs"] == len(rows)
    (row,) = json.loads((out / "table.json").read_text())["methods"]
    assert row["method"] == "rewriter"


def test_rewritten_captions_are_judged_against_the_original_prompts():
    """An image of a rewrite is scored for the prompt it stands for: base given the caption itself as its
    "rewrite" gives base's own results."""
    from diffalign.shapes.demo import heldout_eval_set, load_base_pipeline

    prompts, seeds = heldout_eval_set(1, 1)
    pipe = load_base_pipeline()
    same = efficacy.heldout_results(pipe, prompts, seeds)
    assert efficacy.heldout_results(pipe, prompts, seeds, texts=[p.text for p in prompts]) == same
    other = efficacy.heldout_results(pipe, prompts, seeds, texts=["a photo of a red circle"] * len(prompts))
    assert other["utility"] != same["utility"]
