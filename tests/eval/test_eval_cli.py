"""`diffalign eval` end to end: a tiny random pipeline against its LoRA, and the bundled Shapes model
against a LoRA on a few Shapes prompts; results recomputed from the saved images; the report's
grids and plots; resuming; recipe, override and flag parsing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import report_images
from PIL import Image

from diffalign.cli import main
from diffalign.data.generated import read_folder
from diffalign.eval.compare import paired_comparison

REPO = Path(__file__).resolve().parents[2]


def test_tiny_pipeline_results_recomputable_from_images(tiny_run, capsys):
    from diffalign.rewards import load_reward

    out, argv = tiny_run
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "jpeg-compressibility" in printed and "win rate" in printed and "results.json" in printed
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"model", "compare"}
    assert res["models"]["compare"]["label"].endswith("sd + LoRA eval_lora0/final")
    assert res["prompt_set"] == {"name": "file", "limit": None, "n_prompts": 3, "images_per_prompt": 2}
    gen = res["models"]["compare"]["generation"]
    assert gen["generated"] == 6 and gen["settings"]["lora"].endswith("final")
    assert set(gen["versions"]) >= {"torch", "diffusers", "transformers", "diffalign"}

    reward = load_reward("jpeg-compressibility")
    per_role = {}
    for role in ("model", "compare"):
        ims = read_folder(out / role)
        assert [im.key for im in ims] == [(i, j) for i in range(3) for j in range(2)]
        per_role[role] = reward.score([Image.open(im.path).convert("RGB") for im in ims],
                                      [im.prompt for im in ims]).tolist()
        m = res["models"][role]["summary"]
        assert m["metrics"]["jpeg-compressibility"]["mean"] == pytest.approx(np.mean(per_role[role]))
        animals = [s for s, im in zip(per_role[role], ims) if im.category == "animals"]
        assert m["by"]["category"]["animals"] == {"n": 4, "jpeg-compressibility": pytest.approx(np.mean(animals))}
    assert per_role["model"] != per_role["compare"]  # the LoRA changes the images
    expected = paired_comparison(per_role["compare"], per_role["model"], n_boot=300, groups=[0, 0, 1, 1, 2, 2])
    got = res["comparison"]["metrics"]["jpeg-compressibility"]
    for key in ("mean_diff", "win_rate", "wins", "losses", "n_prompts"):
        assert got[key] == pytest.approx(expected[key])
    assert got["diff_ci95"] == pytest.approx(list(expected["diff_ci95"]))
    assert set(res["comparison"]["by"]["category"]) == {"animals", "things"}
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and rows[0]["file"] == "00000/samples/0000.png"
    assert "geneval" not in res["metrics"]  # no GenEval metadata, no detector


def test_tiny_pipeline_report_has_grids_and_plots(tiny_run):
    out, argv = tiny_run
    if not (out / "report.html").is_file():
        assert main(argv) == 0
    html = (out / "report.html").read_text()
    for heading in ("Summary", "By category", "Score distributions", "Win rates", "Images"):
        assert f">{heading}</h2>" in html
    imgs = report_images(html)
    plots = {alt: im for alt, _, im in imgs["plot"]}
    assert set(plots) == {"score histograms", "win rates", "win rates by category"}
    assert all(im.width > 200 and len(set(im.convert("RGB").getdata())) > 10 for im in plots.values())
    tiles = imgs["tile"]
    # prompt by prompt, seed by seed, the same seed side by side (base model, then the LoRA)
    assert [alt for alt, _, _ in tiles] == [f"prompt {p} sample {j} {role}" for p in (0, 1, 2) for j in (0, 1)
                                            for role in ("model", "compare")]  # round robin over the categories
    scores = {(r["model"], r["prompt_index"], r["sample_index"]): r["jpeg-compressibility"]
              for r in map(json.loads, (out / "scores.jsonl").read_text().splitlines())}
    for alt, width, im in tiles:
        _, p, _, j, role = alt.split()
        assert width == 128  # 32 px images shown 4x
        saved = Image.open(out / role / f"{int(p):05d}" / "samples" / f"{int(j):04d}.png").convert("RGB")
        assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(saved))
        # its score right under it
        assert f"alt='{alt}'" in html
        after = html.split(f"alt='{alt}'", 1)[1]
        assert after.split("</td>", 1)[0].endswith(
            f"<span class='score'>jpeg-compressibility {scores[role, int(p), int(j)]:.3f}</span>")


def test_second_run_generates_nothing_and_reproduces_results(tiny_run, capsys):
    out, argv = tiny_run
    if not (out / "results.json").is_file():
        assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    assert main(argv) == 0
    capsys.readouterr()
    second = json.loads((out / "results.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == mtimes
    for role in ("model", "compare"):
        assert second["models"][role]["generation"]["generated"] == 0
        assert second["models"][role]["generation"]["skipped"] == 6
        assert second["models"][role]["summary"] == first["models"][role]["summary"]
    assert second["comparison"]["metrics"] == first["comparison"]["metrics"]


def test_scoring_existing_folders(tiny_run, tmp_path, capsys):
    out, argv = tiny_run
    if not (out / "model").is_dir():
        assert main(argv) == 0
    first = json.loads((out / "results.json").read_text())
    assert main(["eval", "--images", str(out / "model"), "--compare-images", str(out / "compare"),
                 "--rewards", "jpeg-compressibility", "--output-dir", str(tmp_path / "rescored"),
                 "--scoring.n_boot=300"]) == 0
    capsys.readouterr()
    again = json.loads((tmp_path / "rescored" / "results.json").read_text())
    assert again["comparison"]["metrics"] == first["comparison"]["metrics"]
    assert not (tmp_path / "rescored" / "model").exists()  # scored in place, nothing generated


@pytest.fixture(scope="module")
def shapes_lora(tmp_path_factory):
    """A LoRA on the bundled Shapes base model (random non-zero weights, as after some training)."""
    from diffalign.models import load_backbone
    from diffalign.shapes.model import base_model_path

    backbone = load_backbone(base_model_path())
    backbone.add_lora(rank=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in backbone.raw_denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return backbone.save_trained(tmp_path_factory.mktemp("shapes_lora") / "final")


@pytest.mark.slow
def test_shapes_recipe_base_vs_lora(shapes_lora, tmp_path, capsys):
    from diffalign.eval.geneval import evaluate_image
    from diffalign.rewards import load_reward
    from diffalign.shapes.evaluate import shapes_eval
    from diffalign.shapes.geneval import ShapesDetector

    out = tmp_path / "shapes"
    assert main(["eval", str(REPO / "pipelines" / "eval-shapes.yaml"), "--limit", "1", "--images-per-prompt", "1",
                 "--steps", "4", "--compare-lora", str(shapes_lora), "--output-dir", str(out),
                 "--scoring.n_boot=200", "--generation.batch_size=6"]) == 0
    printed = capsys.readouterr().out
    assert "shapes-segmenter (non-official): not comparable with published GenEval" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["geneval"]["official"] is False and "non-official" in res["geneval"]["detector"]
    assert res["metrics"] == ["shapes-clip", "geneval"]
    reward = load_reward("shapes-clip")
    for role in ("model", "compare"):
        ims = read_folder(out / role)
        assert len(ims) == 6 and sorted({im.category for im in ims}) == sorted(res["models"][role]["geneval"]["tasks"])
        for im in ims:  # the folder holds the GenEval metadata line of each Shapes prompt
            meta = json.loads((im.path.parents[1] / "metadata.jsonl").read_text())
            assert meta["tag"] == im.category and meta["prompt"] == im.prompt and "include" in meta
        pil = [Image.open(im.path).convert("RGB") for im in ims]
        ge = res["models"][role]["geneval"]
        # the protocol's numbers agree with the Shapes world's own evaluator on the saved images
        own = shapes_eval(pil, [im.prompt for im in ims])
        assert ge["overall"] == pytest.approx(own["overall"])
        assert ge["tasks"] == pytest.approx({t: own[t] for t in ge["tasks"]})
        correct = [float(evaluate_image(p, im.metadata, ShapesDetector())["correct"]) for p, im in zip(pil, ims)]
        summary = res["models"][role]["summary"]["metrics"]
        assert summary["geneval"]["mean"] == pytest.approx(np.mean(correct))
        assert summary["shapes-clip"]["mean"] == pytest.approx(
            float(reward.score(pil, [im.prompt for im in ims]).mean()), abs=1e-5)
        records = [json.loads(line) for line in (out / role / "geneval_results.jsonl").read_text().splitlines()]
        assert [r["correct"] for r in records] == [bool(c) for c in correct]
    html = (out / "report.html").read_text()
    assert "not comparable with published GenEval scores" in html
    assert "GenEval tasks (detector: shapes-segmenter" in html
    tiles = report_images(html)["tile"]
    assert len(tiles) == 12  # 6 prompts, one per task, x 1 seed x 2 models: every task in the grid
    assert html.count("GenEval ✓") + html.count("GenEval ✗") >= 12  # each image's verdict under it
    assert len({int(alt.split()[1]) for alt, _, _ in tiles}) == 6
    assert "class='warning'" in html and "fewer than 5 prompts" in html  # 1 prompt per task


# ---- configuration

def test_recipe_overrides_and_flags(tmp_path):
    import argparse

    from diffalign.eval.cli import add_arguments, build_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args, unknown = parser.parse_known_args([str(REPO / "pipelines" / "eval-shapes.yaml"), "--steps", "7",
                                             "--generation.num_inference_steps=3", "--generation.guidance_scale=2",
                                             "--compare-lora", "runs/x/final", "--prompts", "geneval:/data/g.jsonl",
                                             "--rewards", "pickscore, hpsv2.1"])
    args.overrides = [u.removeprefix("--") for u in unknown]
    cfg = build_config(args)
    assert cfg.generation.num_inference_steps == 7  # the flag wins over the override
    assert cfg.generation.guidance_scale == 2.0 and isinstance(cfg.generation.guidance_scale, float)
    assert (cfg.prompts.name, cfg.prompts.path) == ("geneval", "/data/g.jsonl")
    assert cfg.scoring.rewards == ["pickscore", "hpsv2.1"]
    c = cfg.compare_spec()
    assert (c.pretrained, c.lora) == ("bundled:shapes-sd-base", "runs/x/final")
    assert c.label() == "bundled:shapes-sd-base + LoRA x/final"


@pytest.mark.parametrize("recipe", sorted(p.name for p in (REPO / "pipelines").glob("eval-*.yaml")))
def test_bundled_recipes_parse(recipe):
    from diffalign.eval.config import load_eval_config
    from diffalign.eval.prompts import PROMPT_SETS
    from diffalign.rewards import list_rewards

    cfg = load_eval_config(REPO / "pipelines" / recipe)
    assert cfg.model.pretrained and cfg.prompts.name in PROMPT_SETS
    assert cfg.scoring.rewards and all(r in list_rewards() for r in cfg.scoring.rewards)


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    from diffalign.eval.config import eval_config_from_dict

    assert main(["eval", "--model", "m", "--prompts", "nonsense"]) == 2
    assert "--prompts 'nonsense': not a prompt set" in capsys.readouterr().err
    assert main(["eval", "--prompts", "shapes"]) == 2
    assert "no model to evaluate" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\] in section 'generation'"):
        eval_config_from_dict({"model": {"pretrained": "m"}, "generation": {"stepz": 3}})
    with pytest.raises(ValueError, match="generation.seed must be a number"):
        eval_config_from_dict({"model": {"pretrained": "m"}, "generation": {"seed": "x"}})
    with pytest.raises(ValueError, match="unknown eval recipe section"):
        eval_config_from_dict({"model": {"pretrained": "m"}, "train": {}})


def test_geneval_prompts_without_detector_generate_and_say_so(tiny_sd, tmp_path, capsys):
    bench = REPO.parent / "shared" / "benchmarks"
    if not bench.is_dir():
        pytest.fail(f"benchmark copies not found at {bench}")
    out = tmp_path / "ge"
    assert main(["eval", "--model", str(tiny_sd), "--prompts", f"geneval:{bench}", "--limit", "1",
                 "--images-per-prompt", "1", "--steps", "1", "--device", "cpu", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "note: GenEval protocol not run: no detector set" in printed
    lines = [json.loads(line) for line in (bench / "geneval_evaluation_metadata.jsonl").read_text().splitlines()]
    ims = read_folder(out / "model")
    assert sorted({im.category for im in ims}) == sorted({line["tag"] for line in lines}) and len(ims) == 6
    for im in ims:  # GenEval's own metadata line, in the folder of its line number
        assert json.loads((im.path.parents[1] / "metadata.jsonl").read_text()) == lines[im.prompt_index]
        assert im.path.parents[1].name == f"{im.prompt_index:05d}"
    res = json.loads((out / "results.json").read_text())
    assert res["metrics"] == [] and "geneval" not in res and res["notes"]
    imgs = report_images((out / "report.html").read_text())
    assert len(imgs["tile"]) == 6 and "plot" not in imgs


def test_detector_choice():
    from diffalign.eval.scoring import build_detector
    from diffalign.shapes.geneval import ShapesDetector

    detector, colors = build_detector("shapes")
    assert isinstance(detector, ShapesDetector) and colors is None
    with pytest.raises(ValueError, match="unknown GenEval detector 'yolo'"):
        build_detector("yolo")
    with pytest.raises(OSError, match="neither a local folder nor downloadable"):
        build_detector(f"transformers:{REPO / 'no-such-detector'}")


def test_a_bundled_eval_recipe_resolves_by_name_outside_the_repository(tmp_path, monkeypatch):
    import argparse

    from diffalign.eval.cli import add_arguments, build_config

    monkeypatch.chdir(tmp_path)  # no pipelines/ here
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["eval-shapes"])
    args.overrides = []
    cfg = build_config(args)
    assert cfg.model.pretrained == "bundled:shapes-sd-base" and cfg.prompts.name == "shapes"
