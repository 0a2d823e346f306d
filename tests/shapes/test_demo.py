"""`diffalign demo` end to end at a toy size: the files and the table a user sees."""

import base64
import io
import json
import random
import re
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffalign.cli import main
from diffalign.data.pairs import decode_image
from diffalign.shapes.demo import (
    Candidates,
    load_base_pipeline,
    preference_rows,
    sample_candidates,
    write_feedback_data,
)
from diffalign.shapes.grammar import parse_prompt, sample_prompt
from diffalign.shapes.oracle import Oracle, to_png_bytes


def test_preference_rows_pair_best_with_worst_and_flip_reverses_labels():
    p = parse_prompt("a photo of a red circle")
    imgs = {n: Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i, n in enumerate("abcdef")}
    cands = Candidates([p, p], [[imgs["a"], imgs["b"], imgs["c"]], [imgs["d"], imgs["e"], imgs["f"]]],
                       [[0.2, 0.9, 0.5], [0.7, 0.1, 0.4]])
    oracle = Oracle(noise=0.0, temperature=0.0)
    rows = preference_rows(cands, oracle)
    # prompt 0: best b (0.9) first, worst a (0.2) second; prompt 1 alternates: worst e (0.1) first, best d second
    # the images are stored losslessly: the training pixels are the ones the oracle scored
    png = {to_png_bytes(im): n for n, im in imgs.items()}
    assert [(png[r["jpg_0"]], png[r["jpg_1"]], r["label_0"]) for r in rows] == [("b", "a", 1.0), ("e", "d", 0.0)]
    decoded = decode_image(rows[0]["jpg_0"], "row 0")
    assert np.array_equal(np.asarray(decoded), np.asarray(imgs["b"]))
    flipped = preference_rows(cands, oracle, flip=True)
    assert [r["label_0"] for r in flipped] == [0.0, 1.0]



def test_feedback_data_likes_images_above_the_median_utility_and_reads_back_for_kto(tmp_path):
    from diffalign.data.kto import read_feedback

    p = parse_prompt("a photo of a red circle")
    imgs = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(6)]
    cands = Candidates([p, p], [imgs[:3], imgs[3:]], [[0.2, 0.9, 0.5], [0.7, 0.1, 0.4]])  # median 0.45
    path = write_feedback_data(cands, Oracle(noise=0.0), tmp_path / "fb")
    samples = list(read_feedback(path))
    assert [s.desirable for s in samples] == [False, True, True, True, False, False]
    assert all(s.prompt == p.text for s in samples)
    assert np.array_equal(np.asarray(samples[1].image.convert("RGB")), np.asarray(imgs[1]))  # lossless
    flipped = read_feedback(write_feedback_data(cands, Oracle(noise=0.0), tmp_path / "flip", flip=True))
    assert [s.desirable for s in flipped] == [True, False, False, False, True, True]
    noisy = [Oracle(noise=0.5, seed=s).like_from_utility(0.9, 0.45) for s in range(200)]
    assert 60 < sum(noisy) < 140  # the oracle's label noise flips about half at noise 0.5


@pytest.fixture(scope="module")
def toy_demo(tmp_path_factory):
    """`diffalign demo` at a toy size: its output folder and what it printed."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    printed = io.StringIO()
    with redirect_stdout(printed):
        rc = main(["demo", "--output-dir", str(out), "--train-prompts", "6", "--eval-prompts-per-task", "1",
                   "--images-per-prompt", "2", "--sample-steps", "2", "--eval-steps", "2",
                   "--train.max_steps=3", "--train.batch_size=2", "--train.lr_warmup_steps=0"])
    assert rc == 0
    return out, printed.getvalue()


@pytest.mark.slow
def test_demo_writes_results_report_and_table(toy_demo):
    out, table = toy_demo
    results = json.loads((out / "results.json").read_text())
    assert results["labels"]["pairs"] == 6
    assert results["n_images"] == 6 * 2  # 6 tasks × 1 prompt × 2 seeds
    assert set(results["shapes_eval"]["base"]) >= {"overall", "counting", "position"}
    lo, hi = results["oracle_win_rate"]["ci95"]
    assert 0.0 <= lo <= results["oracle_win_rate"]["aligned_over_base"] <= hi <= 1.0
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 1 + 2 * 12  # the training plot and each base/aligned pair
    assert "training curves" in html
    assert re.search(r"ShapesEval overall\s+\d\.\d{3}\s+\d\.\d{3}", table)
    assert "oracle win rate aligned over base" in table
    assert (out / "train" / "final" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.slow
def test_demo_report_shows_the_plot_and_the_grid_in_headless_chromium(toy_demo, tmp_path):
    from browser import find, require_chromium, screenshot

    browser = require_chromium()
    out, _ = toy_demo
    html = (out / "report.html").read_text()
    images = [(width, Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
              for width, data in re.findall(r"<img (?:width=(\d+) )?src='data:image/png;base64,([^']*)'", html)]
    plot = next(im for width, im in images if not width)           # the training curves, at their own size
    width, cell = next((int(w), im) for w, im in images if w)      # the first base image of the grid, enlarged
    pixels = np.asarray(screenshot(browser, out / "report.html", tmp_path / "demo.png")).astype(int)
    w, h = plot.size
    curve = np.asarray(plot.crop((w // 8, h // 8, w // 2, h - h // 8))).astype(int)  # the loss panel's middle
    assert find(pixels, curve) < 1.0, "the training-curve plot is not on the rendered page"
    scale = width // cell.width
    enlarged = np.asarray(cell.resize((cell.width * scale, cell.height * scale), Image.Resampling.NEAREST)).astype(int)
    assert find(pixels, enlarged) < 1.0, "the base/aligned grid is not on the rendered page"
    assert (pixels == (255, 243, 205)).all(-1).sum() > 2000, "the few-prompts warning box is not visible"


def test_candidates_keep_best_and_worst_and_round_trip(tmp_path):
    p = parse_prompt("a photo of a red circle")
    imgs = [Image.new("RGB", (8, 8), (50 * i, 0, 0)) for i in range(3)]
    cands = Candidates([p], [imgs], [[0.1, 0.9, 0.5]])
    back = Candidates.load(cands.extremes().save(tmp_path / "c.parquet"))
    assert back.prompts == [p] and back.utilities == [[0.9, 0.1]]
    assert [im.getpixel((0, 0)) for im in back.images[0]] == [(50, 0, 0), (0, 0, 0)]  # lossless PNG
    with pytest.raises(ValueError, match="not a Shapes candidates file"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"caption": ["x"]}), tmp_path / "bad.parquet")
        Candidates.load(tmp_path / "bad.parquet")


CANDIDATES = Path(__file__).resolve().parents[2] / "datasets" / "shapes-candidates" / "candidates.parquet"


def test_bundled_candidates_are_the_base_models_samples():
    """The first 4 prompts (one sampling batch of 16) drawn again as the demo draws them: same prompts, same
    best and worst images, same utilities."""
    bundled = Candidates.load(CANDIDATES)
    assert len(bundled.prompts) == 400 and all(len(g) == 2 for g in bundled.images)
    rng = random.Random(0)
    prompts = [sample_prompt(rng, split="train") for _ in range(4)]
    assert [p.text for p in prompts] == [p.text for p in bundled.prompts[:4]]
    fresh = sample_candidates(load_base_pipeline(), prompts, images_per_prompt=4, seed=0, progress=None).extremes()
    for got, want in zip(fresh.images, bundled.images[:4]):
        for a, b in zip(got, want):
            assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 2
    assert np.allclose(fresh.utilities, bundled.utilities[:4], atol=0.02)


def test_demo_uses_the_bundled_candidates_after_a_spot_check(tmp_path, monkeypatch, capsys):
    """The demo's default candidates: the bundled samples when a fresh sample of the first prompt matches
    them; a file that does not match (here: one image altered) is not used, and everything is sampled."""
    from diffalign.shapes import demo

    rng = random.Random(0)
    prompts = [sample_prompt(rng, split="train") for _ in range(2)]
    cfg = demo.DemoConfig(train_prompts=2, spot_check_prompts=1)
    pipe = load_base_pipeline()
    got, source = demo.training_candidates(pipe, prompts, cfg)
    assert source == "bundled (spot-checked)" and "re-sampled and matched" in capsys.readouterr().out
    bundled = Candidates.load(CANDIDATES)
    assert [p.text for p in got.prompts] == [p.text for p in bundled.prompts[:2]] and got.utilities == bundled.utilities[:2]

    tampered = Candidates.load(CANDIDATES)
    tampered.images[0][0] = Image.new("RGB", tampered.images[0][0].size, (255, 0, 255))
    monkeypatch.setattr(demo, "BUNDLED_CANDIDATES", tampered.save(tmp_path / "candidates.parquet"))
    got, source = demo.training_candidates(pipe, prompts, cfg)
    assert source == "sampled" and "do not match" in capsys.readouterr().out
    assert len(got.images[0]) == 4  # all samples of a fresh draw, not the stored best and worst
    assert not demo.bundled_candidates_match(demo.DemoConfig(sample_steps=10))


def test_shapes_label_writes_the_efficacy_tests_pairs_and_kto_feedback(tmp_path):
    from diffalign.data import read_feedback, read_pickapic
    from diffalign.shapes.demo import BUNDLED_CANDIDATES

    cands = Candidates.load(BUNDLED_CANDIDATES)
    with redirect_stdout(io.StringIO()) as out:
        assert main(["shapes", "label", "--out", str(tmp_path / "pairs")]) == 0
    assert "400 oracle-labelled pairs" in out.getvalue()
    pairs = list(read_pickapic(tmp_path / "pairs" / "train.parquet", drop_ties=False))
    expected = preference_rows(cands, Oracle(noise=0.1, seed=0))  # what the efficacy tests train on
    assert [p.prompt for p in pairs] == [r["caption"] for r in expected]
    winners = [r["jpg_0"] if r["label_0"] >= 0.5 else r["jpg_1"] for r in expected]
    assert all(np.array_equal(np.asarray(p.chosen), np.asarray(decode_image(w, "w"))) for p, w in zip(pairs, winners))

    assert main(["shapes", "label", "--out", str(tmp_path / "flip"), "--flip", "--noise", "0"]) == 0
    assert main(["shapes", "label", "--out", str(tmp_path / "clean"), "--noise", "0"]) == 0
    clean, flip = (list(read_pickapic(tmp_path / d / "train.parquet")) for d in ("clean", "flip"))  # ties out
    assert len(clean) == len(flip) > 390
    assert all(np.array_equal(np.asarray(a.chosen), np.asarray(b.rejected)) for a, b in zip(clean, flip))

    assert main(["shapes", "label", "--out", str(tmp_path / "fb"), "--format", "feedback"]) == 0
    samples = list(read_feedback(tmp_path / "fb" / "feedback.jsonl"))
    assert len(samples) == 800 and 0.3 < np.mean([s.desirable for s in samples]) < 0.7  # median split, 10% noise


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    """A demo report written from held-out prompts (1 per task, 2 seeds) and stand-in images, no training."""
    from diffalign.shapes.demo import compare_images, heldout_eval_set, write_demo_report

    root = tmp_path_factory.mktemp("demo_report")
    prompts, _ = heldout_eval_set(1, 2)
    rng = np.random.default_rng(0)
    base = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in prompts]
    aligned = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in prompts]
    results = compare_images(base, aligned, prompts)
    results.update({"config": {"eval_prompts_per_task": 1}, "labels": {"pairs": 6}})
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.69 - 0.01 * s, "implicit_acc": 0.5})
                                                + "\n" for s in range(1, 6)))
    (root / "config.yaml").write_text("method: {name: diffusion-dpo, beta: 500}\nmodel: {lora_rank: 8}\n"
                                      "train: {learning_rate: 0.002, max_steps: 3, batch_size: 2, seed: 0}\n")
    write_demo_report(root / "report.html", results, base, aligned, prompts, root / "metrics.jsonl",
                      training_config=root / "config.yaml")
    return (root / "report.html").read_text(), results, prompts


def test_demo_report_rows_have_deltas_with_intervals(demo_report):
    from diffalign.shapes.demo import summary_rows

    html, results, _ = demo_report
    rows = summary_rows(results)
    assert {r["metric"] for r in rows} >= {"ShapesEval counting", "ShapesEval position", "ShapesEval overall",
                                          "oracle utility (mean)"}
    for r in rows:
        assert re.fullmatch(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]( ⚠)?", r["Δ aligned − base [95% CI]"])
    assert "Δ aligned − base [95% CI]</th>" in html
    assert "95% percentile bootstrap interval that resamples prompts" in html


def test_demo_report_grid_covers_every_task_with_each_images_verdict(demo_report):
    from diffalign.shapes.grammar import TASKS

    html, results, prompts = demo_report
    cells = re.findall(r"<figure>(.*?)</figure>", html)
    assert len(cells) == len(prompts) == 12
    tasks = {re.search(r"<figcaption>\[(\w+)\]", c).group(1) for c in cells}
    assert tasks == set(TASKS)  # not only single_object and two_object
    for c, i in zip(cells, range(len(prompts))):
        spans = re.findall(r"<span class='score'>([^<]*)</span>", c)
        assert len(spans) == 2 and spans[0].startswith("base: ShapesEval ") and spans[1].startswith("aligned: ")
        assert all(re.search(r"ShapesEval [✓✗] · oracle \d\.\d{3}$", sp) for sp in spans)


def test_demo_report_gives_the_training_settings_and_warns_about_few_prompts(demo_report):
    html, _, _ = demo_report
    assert "Training: diffusion-dpo, β 500, learning rate 0.002, 3 steps, batch 2×1, LoRA rank 8, 6 oracle-labelled " \
           "pairs, seed 0." in html
    assert "<p class='warning'>⚠ Only 1 prompt(s) per task" in html
    numbers = [n for c in re.findall(r"<td>([^<]*)</td>", html) for n in re.findall(r"[+-]?\d+\.\d+", c)]
    assert numbers and all(re.fullmatch(r"[+-]?\d+\.\d{3}", n) for n in numbers)
