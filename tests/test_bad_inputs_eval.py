"""Bad inputs to `diffalign score` and `diffalign eval` (issue 21, item 7): each is a one-line error (exit 2)
before any work, or a counted and reported skip with the partial result kept; nothing else is written."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffalign.cli import main

REWARD = "jpeg-compressibility"  # a rule reward: no weights to load


def _image(seed: int, size: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def _flat_folder(root: Path, n: int = 3) -> Path:
    """``n`` images ``0.png`` ... and a ``prompts.txt`` of one line each (sorted order)."""
    folder = root / "images"
    folder.mkdir(parents=True)
    for i in range(n):
        _image(i).save(folder / f"{i}.png")
    (root / "prompts.txt").write_text("".join(f"prompt {i}\n" for i in range(n)))
    return folder


def _geneval_folder(folder: Path, n_prompts: int = 3, samples: int = 2, seed: int = 0) -> Path:
    """A folder in GenEval's layout (NNNNN/metadata.jsonl, NNNNN/samples/SSSS.png), no GenEval metadata."""
    for i in range(n_prompts):
        pdir = folder / f"{i:05d}"
        (pdir / "samples").mkdir(parents=True)
        (pdir / "metadata.jsonl").write_text(json.dumps({"prompt": f"prompt {i}", "category": f"c{i % 2}"}) + "\n")
        for j in range(samples):
            _image(seed + 10 * i + j).save(pdir / "samples" / f"{j:04d}.png")
    return folder


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _no_reward_loads(monkeypatch) -> None:
    """Make loading any reward (the start of the scoring work) fail the test."""
    import diffalign.rewards.registry as registry

    def fail(*args, **kwargs):
        raise AssertionError("a reward was loaded: the error came after the scoring work started")

    monkeypatch.setattr(registry, "load_reward", fail)


def _no_generation(monkeypatch) -> None:
    import diffalign.eval.runner as runner

    def fail(*args, **kwargs):
        raise AssertionError("a pipeline was loaded: the error came after the generation started")

    monkeypatch.setattr(runner, "load_eval_pipeline", fail)


def test_score_out_into_a_missing_folder_fails_before_scoring(tmp_path, capsys, monkeypatch):
    folder = _flat_folder(tmp_path)
    before = _files(tmp_path)
    _no_reward_loads(monkeypatch)
    out = tmp_path / "no-such-dir" / "scores.csv"
    assert main(["score", "--reward", REWARD, "--images", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --out {out}: the folder {out.parent} does not exist; create it first (nothing was "
                   "scored)")
    assert _files(tmp_path) == before


def test_score_skips_a_garbage_png_counts_it_and_keeps_the_others(tmp_path, capsys):
    folder = _flat_folder(tmp_path, n=3)
    (folder / "1.png").write_bytes(b"not a png at all")
    out = tmp_path / "scores.csv"
    assert main(["score", "--reward", REWARD, "--images", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
                 "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 of 3 images that do not decode: 1.png (UnidentifiedImageError" in err
    assert "wrote 2 rows" in err and "(1 unreadable image(s) skipped)" in err
    rows = list(csv.DictReader(out.open()))
    assert [(r["image"], r["prompt"]) for r in rows] == [("0.png", "prompt 0"), ("2.png", "prompt 2")]
    assert _files(tmp_path) == {"images", "images/0.png", "images/1.png", "images/2.png", "prompts.txt",
                                "scores.csv"}


def test_eval_images_skips_a_garbage_png_counts_it_and_keeps_the_result(tmp_path, capsys):
    folder = _geneval_folder(tmp_path / "imgs")
    (folder / "00001" / "samples" / "0000.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    before = _files(folder)
    out = tmp_path / "run"
    assert main(["eval", "--images", str(folder), "--rewards", REWARD, "--output-dir", str(out),
                 "--scoring.device=cpu"]) == 0
    err = capsys.readouterr().err
    assert "warning: model: skipped 1 of 6 images that do not decode (00001/samples/0000.png:" in err
    results = json.loads((out / "results.json").read_text())
    assert [d["file"] for d in results["skipped"]["model"]] == ["00001/samples/0000.png"]
    assert results["models"]["model"]["summary"]["n_images"] == 5
    assert any("skipped 1 of 6" in n for n in results["notes"])
    assert "skipped 1 of 6 images" in (out / "report.html").read_text()
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(scores) == 5 and all(r["file"] != "00001/samples/0000.png" for r in scores)
    assert _files(folder) == before  # the scored folder is left as it was


def test_eval_unknown_reward_fails_before_any_image_is_generated(tmp_path, capsys, monkeypatch):
    _no_generation(monkeypatch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "run"
    assert main(["eval", "--model", "bundled:shapes-sd-base", "--prompts", str(prompts), "--rewards",
                 f"{REWARD},pickscroe", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffalign eval: error: unknown reward(s) ['pickscroe'] in scoring.rewards (--rewards); "
                          "registered: ")
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_eval_images_with_prompts_is_refused_not_ignored(tmp_path, capsys, monkeypatch):
    folder = _geneval_folder(tmp_path / "imgs")
    _no_reward_loads(monkeypatch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("something else\n")
    out = tmp_path / "run"
    assert main(["eval", "--images", str(folder), "--prompts", str(prompts), "--rewards", REWARD,
                 "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --prompts cannot be used with --images: nothing is generated, and every image is scored "
                   "with the prompt of its folder's NNNNN/metadata.jsonl; drop --prompts, or generate with --model "
                   "instead of --images")
    assert not out.exists()


def test_eval_missing_image_in_a_comparison_is_reported(tmp_path, capsys):
    a = _geneval_folder(tmp_path / "a", seed=0)
    b = _geneval_folder(tmp_path / "b", seed=100)
    (b / "00002" / "samples" / "0001.png").unlink()
    out = tmp_path / "run"
    assert main(["eval", "--images", str(a), "--compare-images", str(b), "--rewards", REWARD,
                 "--output-dir", str(out), "--scoring.n_boot=50", "--scoring.device=cpu"]) == 0
    err = capsys.readouterr().err
    msg = ("1 image(s) of model have no compare image (missing or unreadable), so the comparison has 5 pairs, "
           "not 6: prompt 2 sample 1")
    assert f"warning: {msg}" in err
    results = json.loads((out / "results.json").read_text())
    assert results["unpaired"] == {"model": [[2, 1]]}
    assert msg in results["notes"]
    assert results["comparison"]["metrics"][REWARD]["n"] == 5
    assert msg in (out / "report.html").read_text()


def test_offline_hub_id_not_cached_says_so(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _no_generation(monkeypatch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "run"
    assert main(["eval", "--model", "diffalign-tests/not-cached-anywhere", "--prompts", str(prompts),
                 "--rewards", REWARD, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("diffalign eval: error: diffalign-tests/not-cached-anywhere: not a local folder and not in "
                          "the Hugging Face cache (")
    assert "offline (HF_HUB_OFFLINE=1) nothing is downloaded" in err and "model_index.json" not in err
    assert len(err.splitlines()) == 1 and not out.exists()


@pytest.fixture(scope="module")
def shapes_copy(tmp_path_factory) -> Path:
    from diffalign.shapes.model import base_model_path

    dst = tmp_path_factory.mktemp("bad_model") / "shapes-base"
    shutil.copytree(base_model_path(), dst)
    return dst


def test_deleted_unet_weights_are_reported_as_missing_safetensors(shapes_copy, tmp_path, capsys, monkeypatch):
    from diffalign.models import load_backbone
    from diffalign.models.backbone import ModelNotFoundError

    weights = shapes_copy / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.is_file()
    weights.unlink()
    expected = (f"{shapes_copy / 'unet'}: missing weights: no diffusion_pytorch_model.safetensors (the unet "
                "component's weights file was deleted or never copied)")
    with pytest.raises(ModelNotFoundError) as e:
        load_backbone(shapes_copy)
    assert str(e.value) == expected and ".bin" not in str(e.value) and "pickled" not in str(e.value)
    _no_generation(monkeypatch)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    out = tmp_path / "run"
    assert main(["eval", "--model", str(shapes_copy), "--prompts", str(prompts), "--rewards", REWARD,
                 "--output-dir", str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"diffalign eval: error: {expected}"
    assert not out.exists()
