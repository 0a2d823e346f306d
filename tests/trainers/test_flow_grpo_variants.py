"""Flow-GRPO-Fast, MixGRPO and GRPO-Guard: their window schedules by hand, and tiny-SD3 runs through
`diffalign train` (ratio exactly 1 before the first update, only window steps trained, RatioNorm after an
update, a LoRA that plain diffusers loads, clear errors)."""

import json

import pytest
import torch
from run_helpers import PROMPTS, read_metrics

from diffalign.cli import main
from diffalign.trainers.flow_grpo_variants import fast_window, mixgrpo_window


def _args(model_dir, out, method, *extra):
    return ["train", "-", f"--model.pretrained={model_dir}", "--model.lora_rank=4", f"--method.name={method}",
            f"--method.prompts={json.dumps(PROMPTS)}", "--method.resolution=32", "--method.reward=brightness",
            "--method.prompts_per_epoch=1", "--method.images_per_prompt=4", f"--train.output_dir={out}",
            "--train.learning_rate=1e-2", "--train.checkpointing_steps=0", *extra]


# ------------------------------------------------------------------ windows by hand
def test_fast_window_is_drawn_like_flow_grpo():
    g = torch.Generator().manual_seed(0)
    # SD3 fast_nocfg: w = 3 in [0, 5) of T = 10 -> start = randint(0, 2) inclusive
    starts = {fast_window(10, 3, [0, 5], g) for _ in range(200)}
    assert starts == {(0, 3), (1, 4), (2, 5)}
    # FLUX fast: 3 in [0, 3) -> always steps 0-2
    assert fast_window(6, 3, [0, 3], g) == (0, 3)
    # no window: every step but the last
    assert fast_window(10, 0, [0, 5], g) == (0, 9)
    with pytest.raises(ValueError, match="window_range"):
        fast_window(10, 3, [0, 2], g)


def test_mixgrpo_window_slides_and_rolls_back():
    # defaults: T = 25, W = 4, K = 25, one step per shift; windows end before T - 2 = 23
    w = lambda it, **kw: mixgrpo_window(it, 25, **kw)
    assert [w(i) for i in (0, 24, 25, 49, 50)] == [(0, 4), (0, 4), (1, 5), (1, 5), (2, 6)]
    assert w(19 * 25) == (19, 23) and w(20 * 25) == (20, 23) and w(22 * 25) == (22, 23)
    assert w(23 * 25) == (0, 4)                                   # rolled back
    assert w(300) == (12, 16)                                     # the published 300 iterations
    assert w(23 * 25, roll_back=False) == (22, 23)                # stays at the last window
    assert w(1000, shift_step=0) == (0, 4)                        # MixGRPO-Flash*: frozen at 0-3
    assert w(25, shift_step=4) == (4, 8) and w(6 * 25, shift_step=4) == (0, 4)  # non-overlapping windows
    with pytest.raises(ValueError, match="num_steps >= 3"):
        mixgrpo_window(0, 2)


# ------------------------------------------------------------------ tiny-SD3 runs
def _setup(args):
    from diffalign.trainers.loop import setup
    from diffalign.trainers.registry import load_recipe

    return setup(load_recipe(None, [a.removeprefix("--") for a in args[2:]]))


def test_flow_grpo_fast_trains_only_the_window(tiny_models, tmp_path):
    from diffalign.trainers.online import epoch_plans, online_step, run_rollout

    args = _args(tiny_models["sd3"], tmp_path / "run", "flow-grpo-fast", "--method.num_steps=6",
                 "--method.window_size=2", "--method.window_range=[1,5]", "--train.batch_size=2",
                 "--train.max_steps=2")
    run = _setup(args)
    assert run.method.config.sde_type == "cps" and run.method.config.guidance_scale == 1.0
    rollout = run_rollout(run)
    start, end = run.method.window(run, 0)
    assert rollout.traj.sampler.sde_window == (start, end) and end - start == 2 and 1 <= start <= 3
    assert rollout.metrics["sde_window_start"] == start
    stochastic = rollout.traj.sampler.stds > 0
    assert stochastic.nonzero().flatten().tolist() == list(range(start, end))
    assert (rollout.traj.log_probs[:, ~stochastic] == 0).all()
    plan = epoch_plans(run, rollout)[0]
    trained = {s for step in plan for m in step for s in m.steps.tolist()}
    assert trained == set(range(start, end))                    # every window step, nothing else
    assert len(plan) == 2 and all(len(step) == 2 for step in plan)  # 2 minibatches x 2 window steps
    row = online_step(run, rollout, plan[0])
    assert row["ratio_max_dev"] == 0.0 and row["ratio_mean"] == 1.0   # on-policy: exactly 1
    # the window is a function of (seed, epoch): the same on every process and after a resume
    assert run.method.window(run, 0) == (start, end)
    assert len({run.method.window(run, e) for e in range(30)}) == 3


def test_flow_grpo_fast_run_and_lora_loads_in_diffusers(tiny_models, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    assert main(_args(tiny_models["sd3"], out, "flow-grpo-fast", "--method.num_steps=6", "--method.window_size=2",
                      "--method.window_range=[0,3]", "--train.batch_size=4", "--train.max_steps=2",
                      "--train.gradient_accumulation_steps=1")) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and [r["epoch"] for r in rows] == [0, 1]
    assert rows[0]["ratio_max_dev"] == 0.0 and rows[1]["ratio_max_dev"] == 0.0  # one step per rollout
    assert all(r["sde_window_end"] - r["sde_window_start"] == 2 for r in rows) and rows[0]["grad_norm"] > 0
    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd3"], text_encoder_3=None, tokenizer_3=None)  # T5-less
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", num_inference_steps=2, output_type="np", height=32, width=32)
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(out / "final")
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(before - after).max() > 1e-4


def test_mixgrpo_window_moves_with_the_rollouts(tiny_models, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_models["sd3"], out, "mixgrpo", "--method.num_steps=6", "--method.window_size=2",
                      "--method.shift_interval=1", "--train.batch_size=4", "--train.max_steps=5",
                      "--train.gradient_accumulation_steps=1")) == 0
    rows = read_metrics(out)
    # T = 6: windows end before step 4; one shift per rollout; back to 0 after start 3
    assert [(r["sde_window_start"], r["sde_window_end"]) for r in rows] == [(0, 2), (1, 3), (2, 4), (3, 4), (0, 2)]
    assert all(r["ratio_max_dev"] == 0.0 for r in rows)
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_grpo_guard_ratio_is_one_then_normalised(tiny_models, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_models["sd3"], out, "grpo-guard", "--method.num_steps=3", "--method.clip_range=1e-2",
                      "--method.timestep_fraction=1.0", "--train.batch_size=2", "--train.max_steps=2",
                      "--train.gradient_accumulation_steps=1", "--train.learning_rate=5e-2",
                      "--method.kl_beta=0.01")) == 0
    rows = read_metrics(out)
    assert rows[0]["ratio_max_dev"] == 0.0 and rows[0]["raw_ratio_mean"] == 1.0   # before the update
    assert rows[0]["kl"] == 0.0 and rows[1]["kl"] > 0.0        # the reference is the LoRA-off model
    # the second minibatch of the same rollout is off-policy: RatioNorm's ratio differs from the raw one
    assert rows[1]["epoch"] == 0 and rows[1]["ratio_max_dev"] > 0
    assert rows[1]["ratio_mean"] != rows[1]["raw_ratio_mean"]
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_grpo_guard_loss_on_the_model_is_the_formula(tiny_models, tmp_path):
    """The method's loss on one micro-batch equals grpo_guard_loss of independently rescored transitions."""
    from diffalign.core.sampling import transition_log_probs
    from diffalign.objectives.online import ppo_clip_loss
    from diffalign.trainers.online import epoch_plans, run_rollout

    run = _setup(_args(tiny_models["sd3"], tmp_path / "run", "grpo-guard", "--method.num_steps=3",
                       "--train.batch_size=4", "--train.max_steps=1"))
    rollout = run_rollout(run)
    assert rollout.traj.means.shape == (4, 3, *rollout.traj.latents.shape[2:])
    micro = epoch_plans(run, rollout)[0][0][0]
    with torch.no_grad():  # move the policy off the sampling one
        for name, p in run.backbone.raw_denoiser.named_parameters():
            if "lora_B" in name:
                p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
        out = run.method.loss(rollout, micro)
        traj = rollout.traj[micro.units]
        new = transition_log_probs(run.backbone, traj, micro.steps)
    rows = torch.arange(len(traj))
    s = traj.sampler.stds[micro.steps].double()
    dmu = (new.mean[:, 0] - traj.means[rows, micro.steps]).double()
    x_next = traj.latents[rows, micro.steps + 1].double()
    z = (x_next - traj.means[rows, micro.steps].double()) / s.view(-1, 1, 1, 1)
    log_ratio = (z * dmu).flatten(1).mean(1)                  # RatioNorm's ratio = exp(mean(z·Δμ))
    adv = rollout.tensors["advantages"][micro.units]
    losses, _ = ppo_clip_loss(log_ratio.float(), torch.zeros(4), adv, run.method.config.clip_range)
    expected = (losses / traj.sampler.dt[micro.steps].abs()).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-3, atol=1e-6)
    assert out.metrics["raw_ratio_mean"] != out.metrics["ratio_mean"]


def test_bad_variant_options_are_clear_errors(tiny_models, tmp_path):
    from diffalign.trainers.registry import load_recipe

    with pytest.raises(Exception, match="sde_type"):
        load_recipe(None, ["method.name=grpo-guard", "method.sde_type=cps"])
    with pytest.raises(Exception, match="sde_type"):
        load_recipe(None, ["method.name=flow-grpo", "method.sde_type=dance"])
    with pytest.raises(Exception, match="window_range"):
        load_recipe(None, ["method.name=flow-grpo-fast", "method.window_range=[0,2]"])
    with pytest.raises(ValueError, match="flow-matching model"):
        main(_args(tiny_models["sd"], tmp_path / "r", "mixgrpo", "--method.sde_type=sde", "--train.max_steps=1"))


def test_flow_grpo_fast_resume_gives_the_same_weights(tiny_models, tmp_path):
    """The window is a function of (seed, epoch): a stopped and resumed run samples the same windows."""
    from safetensors.torch import load_file

    common = ["--method.num_steps=5", "--method.window_size=1", "--method.window_range=[0,4]", "--train.batch_size=4",
              "--train.gradient_accumulation_steps=1", "--train.lr_scheduler=constant", "--train.checkpointing_steps=2"]
    unbroken, stopped = tmp_path / "a", tmp_path / "b"
    assert main(_args(tiny_models["sd3"], unbroken, "flow-grpo-fast", *common, "--train.max_steps=4")) == 0
    assert main(_args(tiny_models["sd3"], stopped, "flow-grpo-fast", *common, "--train.max_steps=2")) == 0
    assert main(_args(tiny_models["sd3"], stopped, "flow-grpo-fast", *common, "--train.max_steps=4",
                      "--resume", "latest")) == 0
    ra, rb = read_metrics(unbroken), read_metrics(stopped)
    assert [r["sde_window_start"] for r in ra] == [r["sde_window_start"] for r in rb]
    assert [r["loss"] for r in rb] == pytest.approx([r["loss"] for r in ra], abs=1e-6)
    wa = load_file(unbroken / "final" / "pytorch_lora_weights.safetensors")
    wb = load_file(stopped / "final" / "pytorch_lora_weights.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
