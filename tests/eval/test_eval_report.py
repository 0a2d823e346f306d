"""The eval report at the HTML level (no browser): every compared row has its Δ and interval, "±" is
labelled, small samples are warned about, one number format, images carry their scores, a model trained
by diffalign is named by its method and its run's key settings are given."""

from __future__ import annotations

import re

import yaml

from diffalign.cli import main
from diffalign.eval.config import ModelSpec, training_run
from diffalign.eval.eval_report import MIN_BOOTSTRAP_PROMPTS, breakdown_rows, summary_rows, training_lines


def _html(tiny_run) -> str:
    out, argv = tiny_run
    if not (out / "report.html").is_file():
        assert main(argv) == 0
    return (out / "report.html").read_text()


def _results(tiny_run) -> dict:
    import json

    _html(tiny_run)
    return json.loads((tiny_run[0] / "results.json").read_text())


def test_every_compared_row_has_a_delta_and_intervals(tiny_run):
    results = _results(tiny_run)
    ci = re.compile(r"^[+-]\d+\.\d{3} \[[+-]\d+\.\d{3}, [+-]\d+\.\d{3}\]( ⚠)?$")
    rate = re.compile(r"^\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]( ⚠)?$")
    for row in summary_rows(results):
        assert ci.match(row["Δ compare − model [95% CI]"]) and rate.match(row["win rate of compare [95% CI]"])
    rows = breakdown_rows(results, "category")
    assert {r["category"] for r in rows} == {"animals", "things"}
    for row in rows:
        assert ci.match(row["jpeg-compressibility: Δ [95% CI]"])
        assert rate.match(row["jpeg-compressibility: win rate [95% CI]"])
        assert row["prompts"] == {"animals": 2, "things": 1}[row["category"]]


def test_plus_minus_is_labelled_and_numbers_have_one_format(tiny_run):
    html = _html(tiny_run)
    assert "(mean ± s.e.m.)</th>" in html
    assert "“mean ± s.e.m.” is the mean over images ± one standard error" in html
    assert "95% percentile bootstrap interval that resamples prompts" in html
    cells = re.findall(r"<td>([^<]*)</td>", html)
    numbers = [n for c in cells for n in re.findall(r"[+-]?\d+\.\d+", c)]
    assert numbers and all(re.fullmatch(r"[+-]?\d+\.\d{3}", n) for n in numbers), \
        sorted({n for n in numbers if not re.fullmatch(r"[+-]?\d+\.\d{3}", n)})


def test_too_few_prompts_for_the_bootstrap_is_a_visible_warning(tiny_run):
    html = _html(tiny_run)
    warnings = re.findall(r"<p class='warning'>([^<]*)</p>", html)
    assert any("Only 3 prompt(s) in all" in w for w in warnings)
    assert any(f"2 of 2 category groups have fewer than {MIN_BOOTSTRAP_PROMPTS} prompts (animals: 2, things: 1)" in w
               for w in warnings)
    assert ".warning{" in html  # styled as a box
    assert "warning: Only 3 prompt(s) in all" in _printed_summary(tiny_run)


def _printed_summary(tiny_run) -> str:
    from diffalign.eval.cli import format_summary

    return format_summary(_results(tiny_run))


def test_each_image_has_its_score_under_it(tiny_run):
    html = _html(tiny_run)
    n_tiles = html.count("<img class='tile'")
    assert n_tiles == 3 * 2 * 2
    assert len(re.findall(r"<span class='score'>jpeg-compressibility [+-]?\d+\.\d{3}</span></td>", html)) == n_tiles


def _fake_run(root, method="diffusion-dpo"):
    run = root / "runs" / "shapes-dpo"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"pretrained": "bundled:shapes-sd-base", "lora_rank": 8},
        "data": {"source": "data/train.parquet"}, "method": {"name": method, "beta": 500},
        "train": {"learning_rate": 2e-3, "max_steps": 300, "batch_size": 8, "gradient_accumulation_steps": 1,
                  "seed": 0}}))
    (run / "final" / "README.md").write_text("Trained with diffalign (x) for 120 optimizer steps, LoRA rank 8.\n")
    return run / "final"


def test_a_diffalign_lora_is_named_by_its_method_and_its_settings_are_given(tmp_path):
    final = _fake_run(tmp_path)
    spec = ModelSpec(pretrained="bundled:shapes-sd-base", lora=str(final))
    assert spec.label() == "bundled:shapes-sd-base + diffusion-dpo LoRA (runs/shapes-dpo)"
    assert "train/final" not in spec.label() and "LoRA final" not in spec.label()
    t = training_run(str(final))
    assert t["steps"] == 120 and t["beta"] == 500 and t["learning_rate"] == 2e-3
    lines = training_lines({"models": {"model": {"training": None}, "compare": {"training": t}}})
    assert lines == [f"compare was trained by diffalign ({final.parent}): diffusion-dpo, β 500, learning rate "
                     "0.002, 120 steps, batch 8×1, LoRA rank 8, data data/train.parquet, seed 0"]
    other = tmp_path / "some-lora"
    other.mkdir()
    assert ModelSpec(pretrained="m", lora=str(other)).label() == f"m + LoRA {tmp_path.name}/some-lora"


def test_the_report_gives_the_lora_runs_settings(tiny_run, tiny_sd, tmp_path, capsys):
    import shutil

    out, argv = tiny_run
    _html(tiny_run)
    lora = argv[argv.index("--compare-lora") + 1]
    final = _fake_run(tmp_path)
    shutil.rmtree(final)
    shutil.copytree(lora, final)
    (final / "README.md").write_text("Trained with diffalign (x) for 120 optimizer steps.\n")
    run_out = tmp_path / "eval"
    args = [a if a != lora else str(final) for a in argv]
    args[args.index("--output-dir") + 1] = str(run_out)
    assert main(args) == 0
    capsys.readouterr()
    html = (run_out / "report.html").read_text()
    assert "diffusion-dpo LoRA (runs/shapes-dpo)" in html
    assert "diffusion-dpo, β 500, learning rate 0.002, 120 steps" in html
