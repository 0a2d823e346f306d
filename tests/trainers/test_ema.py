"""train.ema_decay: checkpoints, final/ and validation hand out the moving average of the trained weights."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from run_helpers import read_metrics
from safetensors.torch import load_file

from diffalign.cli import main


def _train(model_dir, data, out, *extra, expect: int = 0):
    args = ["train", "-", f"--model.pretrained={model_dir}", f"--data.source={data}", "--data.resolution=32",
            f"--train.output_dir={out}", "--train.batch_size=2", "--train.learning_rate=1e-2",
            "--train.lr_scheduler=constant", "--model.lora_rank=4", "--method.beta=5000", *extra]
    assert main(args) == expect
    return Path(out)


def _exported(folder: Path) -> dict[str, torch.Tensor]:
    """The diffusers-format LoRA of a checkpoint or final/ (``unet.….lora.down/up.weight``)."""
    return load_file(folder / "pytorch_lora_weights.safetensors")


def _as_exported(trainable: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's names of the trainable weights (``….lora_A.default.weight``) as the diffusers export writes them."""
    return {"unet." + k.replace(".lora_A.default.", ".lora.down.").replace(".lora_B.default.", ".lora.up."): v
            for k, v in trainable.items()}


def test_checkpoints_and_final_hold_the_hand_computed_moving_average(tiny_models, pair_parquet, tmp_path):
    decay = 0.2  # diffusers' EMAModel warm-up: d_1 = 0, d_2 = min(0.2, 2/11), d_3 = min(0.2, 3/12) = 0.2 (capped)
    out = _train(tiny_models["sd"], pair_parquet, tmp_path / "ema", "--train.max_steps=3",
                 "--train.checkpointing_steps=1", f"--train.ema_decay={decay}")
    plain = _train(tiny_models["sd"], pair_parquet, tmp_path / "plain", "--train.max_steps=3",
                   "--train.checkpointing_steps=1")
    ckpts = [out / "checkpoints" / f"step-{n}" for n in (1, 2, 3)]
    raw = [load_file(c / "trainable.safetensors") for c in ckpts]
    # training itself is untouched: the optimizer's weights and the losses equal those of the run without EMA
    for k, v in load_file(plain / "checkpoints" / "step-3" / "trainable.safetensors").items():
        torch.testing.assert_close(raw[2][k], v, rtol=0, atol=0)
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(plain)]

    ema = {k: v.clone() for k, v in raw[0].items()}
    for n, weights in enumerate(raw, start=1):
        d = 0.0 if n == 1 else min(decay, n / (n + 9))
        ema = {k: d * ema[k] + (1 - d) * weights[k] for k in ema}
        stored = load_file(ckpts[n - 1] / "ema.safetensors")
        assert stored.keys() == ema.keys()
        for k in ema:
            torch.testing.assert_close(stored[k], ema[k], rtol=0, atol=1e-7)
        exported = _exported(ckpts[n - 1])
        expected = _as_exported(ema)
        assert exported.keys() == expected.keys()
        for k in expected:
            torch.testing.assert_close(exported[k], expected[k], rtol=0, atol=1e-7)
    final = _exported(out / "final")
    for k, v in _as_exported(ema).items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=1e-7)
    # and it is not the last weights: the average lags them
    last = _as_exported(raw[2])
    assert max((final[k] - last[k]).abs().max().item() for k in last) > 1e-4
    assert math.isclose(read_metrics(out)[0]["loss"], math.log(2), abs_tol=1e-4)
    # final/'s model card says what its weights are; the plain run's does not
    assert "moving average of the trained weights (decay 0.2" in (out / "final" / "README.md").read_text()
    assert "moving average" not in (plain / "final" / "README.md").read_text()


def test_resuming_a_run_without_the_ema_with_it_on_is_a_clear_error(tiny_models, pair_parquet, tmp_path, capsys):
    out = _train(tiny_models["sd"], pair_parquet, tmp_path / "run", "--train.max_steps=1",
                 "--train.checkpointing_steps=1")
    capsys.readouterr()
    _train(tiny_models["sd"], pair_parquet, out, "--train.max_steps=2", "--resume", "latest",
           "--train.checkpointing_steps=1", "--train.ema_decay=0.9", expect=2)  # a usage error, not a skip
    captured = capsys.readouterr()
    assert "step-1/ema.safetensors: missing" in captured.err + captured.out
    assert "train.ema_decay=0" in captured.err + captured.out


@pytest.mark.parametrize("decay", [-0.1, 1.0])
def test_a_decay_outside_0_1_is_refused(decay):
    from diffalign.trainers.ema import WeightEMA

    with pytest.raises(ValueError, match="train.ema_decay must be in"):
        WeightEMA([("w", torch.nn.Parameter(torch.zeros(2)))], decay)


def test_the_ema_is_refused_under_fsdp():
    from diffalign.errors import UsageError
    from diffalign.trainers.loop import setup_ema

    recipe = SimpleNamespace(train=SimpleNamespace(ema_decay=0.9))
    with pytest.raises(UsageError, match="not supported under FSDP"):
        setup_ema(recipe, SimpleNamespace(distributed_type=DistributedType.FSDP), backbone=None)
