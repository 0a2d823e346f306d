"""PRDP on tiny models: the on-policy closed form at the first update, the one-step-at-a-time gradient against
the full-graph gradient of the loss, and a run through `diffalign train` whose LoRA loads in diffusers."""

import json

import pytest
import torch
from run_helpers import PROMPTS, read_metrics

from diffalign.cli import main
from diffalign.core.sampling import transition_log_probs
from diffalign.objectives.prdp import reward_difference_loss

BETA = 1e-3


def _args(model_dir, out, *extra):
    return ["train", "-", f"--model.pretrained={model_dir}", "--model.lora_rank=4", "--method.name=prdp",
            f"--method.prompts={json.dumps(PROMPTS)}", "--method.num_steps=3", "--method.guidance_scale=3.0",
            "--method.resolution=32", f"--train.output_dir={out}", "--train.learning_rate=1e-2",
            "--method.reward=brightness", "--method.prompts_per_epoch=2", "--method.images_per_prompt=3",
            "--train.batch_size=1", "--method.num_inner_epochs=1", f"--method.beta={BETA}",
            "--method.clip_range=1e-4", *extra]


def _setup(tiny_models, tmp_path, *extra):
    from diffalign.trainers.loop import setup
    from diffalign.trainers.registry import load_recipe

    args = _args(tiny_models["sd"], tmp_path / "run", "--train.max_steps=4", *extra)
    return setup(load_recipe(None, [a.removeprefix("--") for a in args[2:]]))


def test_first_update_predicts_zero_difference_and_loss_is_the_closed_form(tiny_models, tmp_path):
    from diffalign.trainers.online import epoch_plans, online_step, run_rollout

    run = _setup(tiny_models, tmp_path)
    rollout = run_rollout(run)
    plan = epoch_plans(run, rollout)[0]
    group = int(plan[0][0].units[0])
    r = rollout.tensors["rewards"][group * 3:(group + 1) * 3].tolist()
    row = online_step(run, rollout, plan[0])
    assert row["pred_diff_abs_max"] == 0.0 and row["ratio_max_dev"] == 0.0 and row["clipfrac"] == 0.0
    targets = [(r[a] - r[b]) / BETA for a in range(3) for b in range(3) if r[a] > r[b]]
    assert row["pairs"] == len(targets) == 3
    assert row["loss"] == pytest.approx(sum(t * t for t in targets) / len(targets), rel=1e-6)
    assert row["grad_norm"] > 0


def test_stepwise_gradient_equals_the_full_graph_gradient(tiny_models, tmp_path):
    """After an update (policy ≠ base ≠ sampling policy), the K micro-batches of one minibatch accumulate
    exactly the gradient of the loss computed with every step's graph at once."""
    from diffalign.trainers.online import epoch_plans, online_step, run_rollout

    run = _setup(tiny_models, tmp_path)
    rollout = run_rollout(run)
    plan = epoch_plans(run, rollout)[0]
    online_step(run, rollout, plan[0])                    # the LoRA moves off zero
    micros, method, params = plan[1], run.method, list(run.backbone.trainable_parameters())
    for m in micros:
        (method.loss(rollout, m).loss / len(micros)).backward()
    stepwise = [p.grad.clone() for p in params]
    run.optimizer.zero_grad(set_to_none=True)

    g, m0 = 3, micros[0]
    idx = (m0.units[:, None] * g + torch.arange(g)).reshape(-1)
    steps = m0.group_steps.repeat_interleave(g, dim=0)
    traj = rollout.traj[idx]
    logp = transition_log_probs(run.backbone, traj, steps).log_prob
    with torch.no_grad(), run.backbone.reference():
        ref = transition_log_probs(run.backbone, traj, steps).log_prob
    old = traj.log_probs[torch.arange(len(idx))[:, None], steps]
    out = reward_difference_loss(logp - ref, old - ref, rollout.tensors["rewards"][idx], group_size=g, beta=BETA,
                                 clip_range=1e-4)
    out.losses.mean().backward()
    assert out.predicted.abs().max() > 0                   # a real check: the policy predicts something now
    for p, s in zip(params, stepwise):
        torch.testing.assert_close(s, p.grad, rtol=1e-4, atol=1e-6)


def test_prdp_run_writes_the_run_and_lora_loads_in_diffusers(tiny_models, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    assert main(_args(tiny_models["sd"], out, "--train.max_steps=4", "--train.checkpointing_steps=2")) == 0
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1]
    assert rows[0]["pred_diff_abs_max"] == 0.0
    # epoch 1: sampled by the trained policy (its ratio to π_old is 1), compared with the base model (not 0)
    assert rows[2]["ratio_max_dev"] == 0.0 and rows[2]["pred_diff_abs_max"] > 0
    assert (out / "checkpoints" / "step-2" / "pytorch_lora_weights.safetensors").is_file()
    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd"])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", num_inference_steps=2, output_type="np", height=32, width=32)
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(out / "final")
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(before - after).max() > 1e-4


def test_prdp_reference_rollout_resets_the_prediction_every_epoch(tiny_models, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_models["sd"], out, "--train.max_steps=4", "--method.reference=rollout")) == 0
    rows = read_metrics(out)
    assert rows[0]["pred_diff_abs_max"] == 0.0 and rows[2]["pred_diff_abs_max"] == 0.0


def test_prdp_bad_options(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="images_per_prompt must be >= 2"):
        main(_args(tiny_models["sd"], tmp_path / "r", "--method.images_per_prompt=1", "--train.max_steps=1"))
    with pytest.raises(ValueError, match="reference must be"):
        main(_args(tiny_models["sd"], tmp_path / "r", "--method.reference=ema", "--train.max_steps=1"))


@pytest.mark.slow
def test_shapes_prdp_recipe_trains_on_the_bundled_model(tmp_path):
    from pathlib import Path

    recipe = Path(__file__).resolve().parents[2] / "pipelines" / "shapes-prdp.yaml"
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--method.num_steps=3", "--method.images_per_prompt=2", "--train.max_steps=1",
                 f"--train.output_dir={out}", "--train.checkpointing_steps=0"]) == 0
    row = read_metrics(out)[0]
    assert row["pred_diff_abs_max"] == 0.0 and row["grad_norm"] > 0
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_prdp_full_fine_tune_compares_with_the_frozen_copy(tiny_models, tmp_path):
    """``model.lora_rank: 0`` (the paper's full UNet fine-tune): the reference is the frozen copy of the base."""
    out = tmp_path / "run"
    assert main(_args(tiny_models["sd"], out, "--model.lora_rank=0", "--train.learning_rate=1e-4",
                      "--train.max_steps=3")) == 0
    rows = read_metrics(out)
    assert rows[0]["pred_diff_abs_max"] == 0.0
    assert rows[2]["epoch"] == 1 and rows[2]["ratio_max_dev"] == 0.0 and rows[2]["pred_diff_abs_max"] > 0
