"""`diffalign train` as a user meets it: --help lists a recipe's fields, --dry-run checks and plans without
training, config errors are one line with exit status 2 (a traceback only with --debug)."""

import dataclasses
import json

import pytest

from diffalign.cli import main


def test_help_with_a_recipe_lists_every_field_with_type_value_and_doc(capsys):
    from diffalign.trainers.config import DataConfig, ModelConfig, TrainConfig
    from diffalign.trainers.kto import DiffusionKTOConfig

    assert main(["train", "shapes-kto", "--help"]) == 0
    out = capsys.readouterr().out
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig),
                         ("method", DiffusionKTOConfig)):
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name}: " in out, f"{section}.{f.name} missing from --help"
    assert "--method.paired_noise: bool = True   (default False)" in out  # the recipe's value and the default
    assert "--train.learning_rate: float = 0.002" in out
    assert "AdamW's learning rate" in out and "LoRA rank on the denoiser" in out  # the docs
    assert main(["train", "--help"]) == 0 and "--dry-run" in capsys.readouterr().out


def test_dry_run_checks_paths_prints_the_plan_and_writes_nothing(tiny_models, pair_parquet, tmp_path, capsys):
    out_dir = tmp_path / "run"
    args = ["train", "-", f"--model.pretrained={tiny_models['sd']}", f"--data.source={pair_parquet}",
            f"--train.output_dir={out_dir}", "--method.name=mapo", "--dry-run"]
    assert main(args) == 0
    plan = capsys.readouterr().out
    assert "method   mapo (offline" in plan and "local folder" in plan and "1 file(s)" in plan
    assert "nothing was trained" in plan and not out_dir.exists()
    # a missing data file: the plan, then one line naming it, exit 2
    assert main([*args, f"--data.source={tmp_path / 'missing.parquet'}"]) == 2
    captured = capsys.readouterr()
    assert "missing.parquet: no such file or folder" in captured.err and "Traceback" not in captured.err
    assert "nothing there" in captured.out


def test_config_errors_are_one_line_with_exit_2_and_a_traceback_only_with_debug(capsys):
    assert main(["train", "shapes-mapo", "--method.bta=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("diffalign train: error: bad option for method 'mapo': unknown option(s) ['bta']; "
                   "known options: beta, snr_value")
    assert main(["train", "no-such-recipe"]) == 2
    assert "recipe no-such-recipe does not exist" in capsys.readouterr().err
    assert main(["train", "shapes-mapo", "--train.max_steps=-3"]) == 2
    assert capsys.readouterr().err.strip() == "diffalign train: error: train.max_steps must be > 0, not -3"
    from diffalign.trainers.config import ConfigError

    with pytest.raises(ConfigError, match="max_steps"):
        main(["train", "shapes-mapo", "--train.max_steps=-3", "--debug"])


def test_a_rerun_into_an_earlier_run_needs_resume_or_overwrite(tiny_models, pair_parquet, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "-", f"--model.pretrained={tiny_models['sd']}", f"--data.source={pair_parquet}",
            "--data.resolution=32", f"--train.output_dir={out}", "--train.batch_size=2", "--train.max_steps=2",
            "--train.checkpointing_steps=0", "--model.lora_rank=4"]
    assert main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(args) == 2  # refused before any model loads: nothing of the earlier run changes
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume latest" in err and "--overwrite" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert main([*args, "--overwrite", "--train.max_steps=1"]) == 0  # replaced, not appended to
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
