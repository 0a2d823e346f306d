"""Bad inputs and faults on the training side (issue #21): each case is a clear one-line error (exit 2,
naming the field or file) or a reported recovery, and nothing else in the run directory changes.

Runs use a tiny random SD1.x pipeline and a few Pick-a-Pic rows at 32 px (seconds each)."""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import pytest
from run_helpers import read_metrics

from diffalign.cli import main


def _jpeg(color: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory) -> Path:
    from diffalign import testing

    return testing.make_tiny_sd(tmp_path_factory.mktemp("models") / "sd")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """6 Pick-a-Pic rows, one of them a tie."""
    from diffalign.data.pickapic import write_pickapic_parquet

    good, bad = _jpeg((250, 220, 40)), _jpeg((30, 30, 200))
    rows = [{"caption": f"a yellow disc {i}", "jpg_0": good, "jpg_1": bad, "label_0": 0.5 if i == 2 else 1.0}
            for i in range(6)]
    path = tmp_path_factory.mktemp("data") / "pairs.parquet"
    write_pickapic_parquet(rows, path)
    return path


def _args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "-", f"--model.pretrained={model}", f"--data.source={data}", "--data.resolution=32",
            f"--train.output_dir={out}", "--train.batch_size=2", "--train.learning_rate=1e-3",
            "--train.checkpointing_steps=0", "--model.lora_rank=4", "--train.lr_scheduler=constant", *extra]


def _train(model: Path, data: Path, out: Path, *extra: str) -> Path:
    assert main(_args(model, data, out, *extra)) == 0
    return out


def snapshot(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (the cache excluded: a content-keyed store)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and "cache" not in p.relative_to(folder).parts}


def _refused(args: list[str], capsys, *message: str) -> str:
    """``diffalign`` exits 2 with one error line on stderr (no traceback; progress bars of model loading may
    come before it) holding every part of ``message``."""
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]
    assert line.startswith("diffalign train: error: ") and "Traceback" not in err, err
    for part in message:
        assert part in line, line
    return line


@pytest.fixture()
def run_dir(tmp_path) -> Path:
    """A run directory that already holds a file of the user's (not a run)."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return out


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("override,message", [
    ("--method.beta=-5", "method 'diffusion-dpo' option beta must be > 0, not -5.0"),
    ("--method.beta=0", "method 'diffusion-dpo' option beta must be > 0, not 0.0"),
    ("--data.caption_dropout=2", "data.caption_dropout must be in [0, 1], not 2.0"),
    ("--train.max_steps=-3", "train.max_steps must be > 0, not -3"),
    ("--train.batch_size=0", "train.batch_size must be > 0, not 0"),
    ("--train.max_nonfinite_steps=0", "train.max_nonfinite_steps must be > 0, not 0"),
    ("--train.mixed_precision=fp32", "train.mixed_precision must be one of no, fp16, bf16, fp8, not 'fp32'"),
    ("--model.family=sdxxl", "model.family must be one of sd, sdxl, sd3, wan, qwen-image, z-image, flux, not 'sdxxl'"),
    ("--data.drop_ties=yes", "data.drop_ties must be true or false, not 'yes'"),
])
def test_setting_out_of_range_is_one_line_before_anything_runs(override, message, tiny_sd, pairs, run_dir, capsys):
    before = snapshot(run_dir)
    _refused(_args(tiny_sd, pairs, run_dir, "--train.max_steps=1", override), capsys, message)
    assert snapshot(run_dir) == before


def test_mixed_precision_no_on_the_command_line_is_the_string_no(tmp_path):
    from diffalign.trainers.registry import load_recipe

    assert load_recipe(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  mixed_precision: no\n  overwrite: false\n")
    loaded = load_recipe(recipe)
    assert loaded.train.mixed_precision == "no" and loaded.train.overwrite is False


def test_family_that_does_not_match_the_model_folder(tiny_sd, pairs, run_dir, capsys):
    before = snapshot(run_dir)
    _refused(_args(tiny_sd, pairs, run_dir, "--train.max_steps=1", "--model.family=sdxl"), capsys,
             "model.family is 'sdxl' but", "is a 'sd' pipeline", "set model.family=sd")
    assert snapshot(run_dir) == before


def test_flow_prediction_in_an_epsilon_models_scheduler_is_refused(tiny_sd, pairs, run_dir, tmp_path, capsys):
    model = tmp_path / "edited-sd"
    shutil.copytree(tiny_sd, model)
    config_path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "flow_prediction"
    config_path.write_text(json.dumps(config))
    before = snapshot(run_dir)
    _refused(_args(model, pairs, run_dir, "--train.max_steps=1"), capsys,
             "prediction_type 'flow_prediction' and use_flow_sigmas False", "scheduler_config.json")
    assert snapshot(run_dir) == before


def test_kept_ties_are_refused_for_a_method_that_cannot_use_them(tiny_sd, pairs, run_dir, capsys):
    before = snapshot(run_dir)
    _refused(_args(tiny_sd, pairs, run_dir, "--train.max_steps=1", "--data.drop_ties=false"), capsys,
             "data.drop_ties is false, but method 'diffusion-dpo' cannot use a tie",
             "keep data.drop_ties: true")
    assert snapshot(run_dir) == before


def test_a_method_that_declares_uses_ties_may_keep_them(monkeypatch):
    from diffalign.trainers.dpo import DiffusionDPO
    from diffalign.trainers.registry import load_recipe

    overrides = ["data.drop_ties=false", "data.source=pairs.parquet"]
    with pytest.raises(Exception, match="cannot use a tie"):
        load_recipe(None, overrides)
    monkeypatch.setattr(DiffusionDPO, "uses_ties", True)
    assert load_recipe(None, overrides).data.drop_ties is False


# ---------------------------------------------------------------- faults on resume


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(tiny_sd, pairs, tmp_path, capsys):
    out = _train(tiny_sd, pairs, tmp_path / "run", "--train.max_steps=2", "--train.checkpointing_steps=1")
    weights = out / "checkpoints" / "step-2" / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short, a full disk
    step_1 = snapshot(out / "checkpoints" / "step-1")
    capsys.readouterr()
    _train(tiny_sd, pairs, out, "--train.max_steps=3", "--train.checkpointing_steps=1", "--resume", "latest")
    printed = capsys.readouterr().out
    assert "warning: --resume latest:" in printed and "step-2 cannot be read" in printed
    assert f"resumed from {out / 'checkpoints' / 'step-1'} at step 1" in printed
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert snapshot(out / "checkpoints" / "step-1") == step_1  # the one it resumed from is untouched
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_no_readable_checkpoint_is_one_line_naming_each(tiny_sd, pairs, tmp_path, capsys):
    out = _train(tiny_sd, pairs, tmp_path / "run", "--train.max_steps=1", "--train.checkpointing_steps=1")
    (out / "checkpoints" / "step-1" / "optimizer.json").write_text('{"param_gr')
    before = snapshot(out)
    _refused(_args(tiny_sd, pairs, out, "--train.max_steps=2", "--resume", "latest"), capsys,
             "--resume latest: no checkpoint in", "can be read: step-1 (JSONDecodeError")
    assert snapshot(out) == before


def test_a_named_checkpoint_that_does_not_read_is_one_line_naming_it(tiny_sd, pairs, tmp_path, capsys):
    out = _train(tiny_sd, pairs, tmp_path / "run", "--train.max_steps=1", "--train.checkpointing_steps=1")
    ckpt = out / "checkpoints" / "step-1"
    (ckpt / "random_states.safetensors").unlink()
    before = snapshot(out)
    _refused(_args(tiny_sd, pairs, out, "--train.max_steps=2", "--resume", str(ckpt)), capsys,
             f"--resume {ckpt}: the checkpoint cannot be read", "random_states.safetensors missing")
    assert snapshot(out) == before


def test_partial_last_metrics_line_does_not_block_resume_and_metrics_are_cut_back(tiny_sd, pairs, tmp_path, capsys):
    out = _train(tiny_sd, pairs, tmp_path / "run", "--train.max_steps=3", "--train.checkpointing_steps=2")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 0.6')  # killed while writing a row
    capsys.readouterr()
    _train(tiny_sd, pairs, out, "--train.max_steps=3", "--train.checkpointing_steps=2", "--resume", "latest")
    assert "dropped 1 line(s) that are not JSON rows" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]  # cut back to step 2, then step 3 again


def test_resume_latest_without_a_checkpoint_starts_metrics_afresh(tiny_sd, pairs, tmp_path, capsys):
    out = _train(tiny_sd, pairs, tmp_path / "run", "--train.max_steps=2")
    capsys.readouterr()
    _train(tiny_sd, pairs, out, "--train.max_steps=1", "--resume", "latest")
    assert "no checkpoint" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(out)] == [1]  # not 1, 2, 1: the earlier rows are not mixed in


def test_a_killed_final_write_leaves_no_temp_dir_behind(tiny_sd, pairs, tmp_path, capsys):
    out = _train(tiny_sd, pairs, tmp_path / "run", "--train.max_steps=1", "--train.checkpointing_steps=1")
    stale = [out / ".tmp-final-99999", out / "checkpoints" / ".tmp-step-2"]  # a kill -9 during the writes
    for path in stale:
        path.mkdir()
        (path / "half.safetensors").write_bytes(b"\0" * 10)
    before = snapshot(out)
    capsys.readouterr()
    _train(tiny_sd, pairs, out, "--train.max_steps=2", "--train.checkpointing_steps=1", "--resume", "latest")
    assert "removed 2 unfinished write(s) of an earlier run" in capsys.readouterr().out
    after = snapshot(out)
    assert all(after[k] == v for k, v in before.items() if k.startswith("checkpoints/step-1/"))
    assert not any(p.exists() for p in stale)
    assert not [p for p in list(out.iterdir()) + list((out / "checkpoints").iterdir()) if p.name.startswith(".tmp-")]


def test_longer_cosine_schedule_on_resume_continues_it_instead_of_lr_zero(tiny_sd, pairs, tmp_path, capsys):
    cosine = ["--train.lr_scheduler=cosine", "--train.checkpointing_steps=2"]
    out = _train(tiny_sd, pairs, tmp_path / "run", "--train.max_steps=2", *cosine)
    capsys.readouterr()
    _train(tiny_sd, pairs, out, "--train.max_steps=4", "--resume", "latest", *cosine)
    assert "from this recipe's schedule (cosine, 0 warm-up, max_steps 4" in capsys.readouterr().out
    lrs = {r["step"]: r["lr"] for r in read_metrics(out)}
    peak = 1e-3
    for step in (3, 4):  # the lr of step s is the schedule at s - 1 of the recipe's 4 steps
        assert lrs[step] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * (step - 1) / 4)))
    assert lrs[3] > 0


# ---------------------------------------------------------------- text side


def _tiny_lm_folder(path: Path, pickled: bool) -> Path:
    import torch

    from diffalign.text.shapes import make_tiny_lm, shapes_tokenizer

    tok = shapes_tokenizer()
    model = make_tiny_lm(tok, hidden_size=16, layers=1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if pickled:
        (path / "model.safetensors").unlink()
        torch.save(model.state_dict(), path / "pytorch_model.bin")
    return path


def test_pickled_causal_lm_weights_are_refused_unless_allowed(tmp_path, capsys):
    from diffalign.text.model import CausalLM

    folder = _tiny_lm_folder(tmp_path / "lm", pickled=True)
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text(json.dumps({"prompt": "a", "chosen": " red circle", "rejected": " blue square"}) + "\n")
    out = tmp_path / "run"
    args = ["train", "-", "--method.name=text-dpo", f"--model.pretrained={folder}", f"--data.source={pairs_file}",
            "--data.format=trl", f"--train.output_dir={out}", "--train.max_steps=1", "--train.checkpointing_steps=0"]
    _refused(args, capsys, f"{folder}:", "pickled", "--allow-pickle")
    assert snapshot(out) == {}
    assert CausalLM.from_pretrained(folder, allow_pickle=True).model is not None


def test_rewrite_refuses_a_pickled_model_naming_the_flag(tmp_path, capsys):
    folder = _tiny_lm_folder(tmp_path / "lm", pickled=True)
    assert main(["rewrite", "generate", "--model", str(folder), "--prompt", "a red circle"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "pickled" in err and "--allow-pickle" in err, err


def test_pickled_peft_adapter_folder_is_refused(tmp_path):
    from diffalign.models.backbone import PickledWeightsError
    from diffalign.text.model import CausalLM

    base = _tiny_lm_folder(tmp_path / "lm", pickled=False)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base),
                                                            "peft_type": "LORA"}))
    (adapter / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(PickledWeightsError, match="only adapter_model.bin.*--allow-pickle"):
        CausalLM.from_pretrained(adapter)


# ---------------------------------------------------------------- images


def _huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A PNG header saying ``width × height`` (past PIL's decompression-bomb limit), without pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IEND", b""))


def test_a_huge_image_is_a_counted_skip_and_with_strict_one_line_naming_the_row(tiny_sd, tmp_path, capsys):
    import warnings

    from diffalign.data.pickapic import write_pickapic_parquet

    good, bad = _jpeg((250, 220, 40)), _jpeg((30, 30, 200))
    rows = [{"caption": f"a yellow disc {i}", "jpg_0": good, "jpg_1": bad, "label_0": 1.0} for i in range(6)]
    rows[3]["jpg_1"] = _huge_png()
    data = write_pickapic_parquet(rows, tmp_path / "huge.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error", category=__import__("PIL.Image").Image.DecompressionBombWarning)
        out = _train(tiny_sd, data, tmp_path / "run", "--train.max_steps=3")
    stats = json.loads((out / "data_stats.json").read_text())
    assert stats["skipped"] == {"image too large": 1} and stats["bad_rows"] == [f"{data}:row 3"]
    assert "image too large (400,000,000 pixels" in stats["bad_reasons"][0]
    assert "1 bad rows skipped (1 image too large)" in capsys.readouterr().out
    strict = tmp_path / "strict"
    with pytest.raises(ValueError, match=r"huge\.parquet:row 3: field 'jpg_1': image too large \(400,000,000 pixels"):
        main(_args(tiny_sd, data, strict, "--train.max_steps=3", "--data.strict=true"))  # met mid-run, as any bad row
    assert not (strict / "final").exists()
