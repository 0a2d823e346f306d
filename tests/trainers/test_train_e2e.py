"""`diffalign train` end to end on tiny random SD1.x / SDXL / SD3 pipelines."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from run_helpers import read_metrics

from diffalign.cli import main

BETA = {"sd": 5000, "sdxl": 5000, "sd3": 500}


def _train(model_dir, data, out, *extra):
    args = ["train", "-", f"--model.pretrained={model_dir}", f"--data.source={data}", "--data.resolution=32",
            f"--train.output_dir={out}", "--train.batch_size=2", "--train.learning_rate=1e-3",
            "--train.checkpointing_steps=0", "--model.lora_rank=4", *extra]
    assert main(args) == 0
    return Path(out)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_dpo_lora_runs_and_loads_in_plain_diffusers(family, tiny_models, pair_parquet, tmp_path):
    from diffusers import DiffusionPipeline

    out = _train(tiny_models[family], pair_parquet, tmp_path / "run", "--train.max_steps=3",
                 f"--method.beta={BETA[family]}")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert rows[0]["implicit_acc"] == 0.5
    assert {"lr", "implicit_acc", "reward_margin"} <= set(rows[-1])
    written = yaml.safe_load((out / "config.yaml").read_text())  # the resolved recipe, every default written out
    assert written["method"] == {"name": "diffusion-dpo", "beta": float(BETA[family]), "loss_type": "sigmoid",
                                 "loss_weights": None, "label_smoothing": 0.0}

    card = (out / "final" / "README.md").read_text()  # the model card, as the Hub reads it
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == str(tiny_models[family]) and front["library_name"] == "diffusers"
    assert {"diffalign", "diffusion-dpo", "lora"} <= set(front["tags"])
    assert "pipe.load_lora_weights(\"final\")" in card and "3 optimizer steps" in card and "| loss |" in card
    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}  # SD3 without T5, as users load it
    pipe = DiffusionPipeline.from_pretrained(tiny_models[family], **no_t5)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a yellow disc", num_inference_steps=2, output_type="np", height=32, width=32)
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(out / "final")
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(before - after).max() > 1e-4


def test_full_finetune_final_loads_with_from_pretrained(tiny_models, pair_parquet, tmp_path):
    from diffusers import UNet2DConditionModel

    out = _train(tiny_models["sd"], pair_parquet, tmp_path / "run", "--train.max_steps=2", "--model.lora_rank=0",
                 "--train.learning_rate=1e-4")
    unet = UNet2DConditionModel.from_pretrained(out / "final", subfolder="unet")
    base = UNet2DConditionModel.from_pretrained(tiny_models["sd"], subfolder="unet")
    diffs = [(a - b).abs().max().item() for a, b in zip(unet.parameters(), base.parameters())]
    assert max(diffs) > 0


@pytest.mark.slow
@pytest.mark.parametrize("ema", [False, True], ids=["weights", "ema"])
def test_resume_latest_gives_the_same_weights(ema, tiny_models, pair_parquet, tmp_path):
    """With train.ema_decay the handed-out weights are the moving average: a resumed run continues it."""
    from safetensors.torch import load_file

    common = ["--train.checkpointing_steps=2", "--train.lr_scheduler=constant",
              *(["--train.ema_decay=0.5"] if ema else [])]
    unbroken = _train(tiny_models["sd"], pair_parquet, tmp_path / "a", "--train.max_steps=4", *common)
    stopped = _train(tiny_models["sd"], pair_parquet, tmp_path / "b", "--train.max_steps=2", *common)
    assert (stopped / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    assert (stopped / "checkpoints" / "step-2" / "ema.safetensors").is_file() == ema
    resumed = _train(tiny_models["sd"], pair_parquet, tmp_path / "b", "--train.max_steps=4", "--resume", "latest", *common)
    wa = load_file(unbroken / "final" / "pytorch_lora_weights.safetensors")
    wb = load_file(resumed / "final" / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    assert [r["step"] for r in read_metrics(resumed)] == [1, 2, 3, 4]
    assert [r["loss"] for r in read_metrics(resumed)] == pytest.approx([r["loss"] for r in read_metrics(unbroken)], abs=1e-6)


@pytest.mark.slow
def test_swapped_labels_move_the_margin_the_other_way(tiny_models, pair_parquet, swapped_parquet, tmp_path):
    """Train on pairs, and on the same pairs reversed: the implicit reward margin on the original pairs
    (measured with the trained LoRA against the base) has opposite signs."""
    from diffalign.trainers.loop import setup
    from diffalign.trainers.registry import load_recipe

    margins = {}
    for name, data in (("orig", pair_parquet), ("swapped", swapped_parquet)):
        out = _train(tiny_models["sd"], data, tmp_path / name, "--train.max_steps=8", "--train.learning_rate=3e-3")
        recipe = load_recipe(out / "config.yaml", [f"data.source={pair_parquet}", f"train.output_dir={tmp_path / 'eval'}",
                                                   "data.cache_dir=", "train.batch_size=12"])
        run = setup(recipe)
        run.backbone.load_trained(out / "final")
        with torch.no_grad():
            margins[name] = float(run.method.loss(run.data.batch(0, 0, 0, 1)).metrics["reward_margin"])
    assert margins["orig"] > 0 > margins["swapped"]


def test_bench_reports_cached_uncached_and_the_compute_floor(tiny_models, pair_parquet, capsys, tmp_path):
    assert main(["bench", "-", f"--model.pretrained={tiny_models['sd']}", f"--data.source={pair_parquet}",
                 "--data.resolution=32", "--model.lora_rank=4", "--steps", "2", "--json", str(tmp_path / "b.json")]) == 0
    out = capsys.readouterr().out
    assert "uncached" in out and "cached" in out and "peak memory" in out and "compute floor" in out
    r = json.loads((tmp_path / "b.json").read_text())
    # the floor is the compute alone, a cached step adds its data and optimizer work to it
    assert r["pairs_per_s_floor"] > 0 and r["cached_over_floor"] == pytest.approx(
        (r["batch_per_step"] / r["pairs_per_s_cached"]) / r["floor_step_s"])


@pytest.mark.parametrize("method,keys", [("mapo", {"margin", "implicit_acc"}),
                                         ("kto", {"reward_desirable", "reward_undesirable", "kl_reference_point"}),
                                         ("sft", {"model_mse"})])
def test_other_methods_train_on_the_same_loop(method, keys, tiny_models, pair_parquet, tmp_path):
    out = _train(tiny_models["sd"], pair_parquet, tmp_path / method, "--train.max_steps=3", f"--method.name={method}")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert keys <= set(rows[0]) and all(math.isfinite(r["loss"]) for r in rows)
    if method == "kto":  # policy == reference at step 1: every sample's loss is 1 - sigmoid(0)
        assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-5)
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_nonfinite_losses_skip_steps_then_stop_with_a_clear_error(tiny_models, pair_parquet, tmp_path, monkeypatch):
    from diffalign.trainers.config import ConfigError
    from diffalign.trainers.dpo import DiffusionDPO

    with pytest.raises(ConfigError, match="option beta must be > 0, not nan"):  # a NaN β is refused at load
        _train(tiny_models["sd"], pair_parquet, tmp_path / "nan", "--method.beta=.nan", "--debug")
    loss = DiffusionDPO.loss

    def nan_loss(self, batch):  # a loss that blows up at every step
        out = loss(self, batch)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(DiffusionDPO, "loss", nan_loss)
    with pytest.raises(RuntimeError, match="non-finite losses in a row"):
        _train(tiny_models["sd"], pair_parquet, tmp_path / "nan", "--train.max_steps=5",
               "--train.max_nonfinite_steps=2")
    rows = read_metrics(tmp_path / "nan")
    assert [r["skipped"] for r in rows] == [True, True]
    assert not (tmp_path / "nan" / "final").exists()


def test_validation_images_are_written_at_intervals(tiny_models, pair_parquet, tmp_path):
    out = _train(tiny_models["sd"], pair_parquet, tmp_path / "val", "--train.max_steps=2", "--train.validation_steps=2",
                 "--train.validation_prompts=[a yellow disc, a red hat]", "--train.validation_num_inference_steps=2")
    from PIL import Image

    grid = Image.open(out / "validation" / "step-2.png")
    assert grid.width > grid.height  # two images side by side


def test_report_to_tensorboard_logs_the_metrics_rows(tiny_models, pair_parquet, tmp_path):
    """``--train.report_to=tensorboard``: event files under the run directory hold, per step, the same
    scalars as metrics.jsonl, and the validation images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _train(tiny_models["sd"], pair_parquet, tmp_path / "run", "--train.max_steps=3",
                 "--train.report_to=tensorboard", "--train.validation_steps=3",
                 "--train.validation_prompts=[a yellow disc]", "--train.validation_num_inference_steps=2")
    rows = read_metrics(out)
    logs = out / "logs" / "diffalign"
    assert list(logs.glob("events.out.tfevents.*")), f"no event file in {logs}"
    events = EventAccumulator(str(logs), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for key in ("loss", "lr", "implicit_acc", "reward_margin"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-12)) for r in rows], key
    assert [e.step for e in events.Images("validation")] == [3]
    assert (out / "validation" / "step-3.png").is_file()
    # the data's counts as the rows are read: every step's row has them
    for key in ("data/rows_read", "data/kept", "data/ties_dropped", "data/skipped"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(r["step"], r[key]) for r in rows], key



def test_report_to_tensorboard_after_resume_holds_the_rows_of_metrics_jsonl(tiny_models, pair_parquet, tmp_path):
    """A run logged to step 3 with its checkpoint at 2, resumed to 4: metrics.jsonl drops step 3 and logs
    it again; TensorBoard purges the old step 3 (purge_step), so both read the same."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = ["--train.report_to=tensorboard", "--train.lr_scheduler=constant", "--train.checkpointing_steps=2"]
    _train(tiny_models["sd"], pair_parquet, tmp_path / "run", "--train.max_steps=3", *common)
    out = _train(tiny_models["sd"], pair_parquet, tmp_path / "run", "--train.max_steps=4", "--resume", "latest",
                 "--train.checkpointing_steps=0", *common[:2])
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    events = EventAccumulator(str(out / "logs" / "diffalign"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == \
        [(r["step"], pytest.approx(r["loss"], rel=1e-6, abs=1e-12)) for r in rows]

def test_report_to_names_are_checked_before_any_model_loads():
    from diffalign.trainers.loop import log_with

    assert log_with(None) is None and log_with("none") is None and log_with([]) is None
    assert log_with("tensorboard") == ["tensorboard"]
    assert log_with(["tensorboard"]) == ["tensorboard"]
    assert log_with("all") == "all"
    with pytest.raises(ValueError, match="train.report_to: unknown tracker"):
        log_with("tensorbored")


class _Payload:
    """Unpickling this object creates the file ``path`` (what a crafted checkpoint could do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_checkpoints_hold_no_pickle_and_resume_never_unpickles(tiny_models, pair_parquet, tmp_path):
    import pickle

    import torch

    out = _train(tiny_models["sd"], pair_parquet, tmp_path / "run", "--train.max_steps=2",
                 "--train.checkpointing_steps=1")
    ckpt = out / "checkpoints" / "step-2"
    files = sorted(p.name for p in ckpt.iterdir())
    assert not [f for f in files if f.endswith((".pkl", ".bin", ".pt", ".pth"))], files
    assert {"trainable.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
            "random_states.safetensors", "random_states.json", "trainer_state.json"} <= set(files)
    # plant pickle payloads where accelerate's format keeps its pickles: resuming reads none of them
    marker = tmp_path / "code-ran"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "scheduler.bin"):
        (ckpt / name).write_bytes(pickle.dumps(_Payload(marker)))
    torch.save({"state": _Payload(marker)}, ckpt / "optimizer.bin")
    _train(tiny_models["sd"], pair_parquet, out, "--train.max_steps=3", "--resume", "latest")
    assert not marker.exists()
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]


def test_no_checkpoint_is_written_from_weights_that_are_not_finite(tiny_models, pair_parquet, tmp_path, monkeypatch):
    import torch

    from diffalign.trainers import loop

    real = loop.train_step

    def blow_up_after_step_2(run):  # finite losses, then weights that overflowed in the update
        row = real(run)
        if run.global_step >= 3:
            with torch.no_grad():
                next(iter(run.backbone.trainable_parameters())).fill_(float("inf"))
        return row

    monkeypatch.setattr(loop, "train_step", blow_up_after_step_2)
    out = _train(tiny_models["sd"], pair_parquet, tmp_path / "run", "--train.max_steps=4",
                 "--train.checkpointing_steps=1")
    assert [p.name for p in loop.list_checkpoints(out)] == ["step-1", "step-2"]  # latest is finite
