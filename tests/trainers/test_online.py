"""On-line trainers (DDPO/GRPO family, D3PO, SePPO): loss maths by hand, the rollout/plan machinery,
and tiny-model runs through `diffalign train` (files, diffusers-loadable LoRA, ratio exactly 1, resume)."""

import json
import math
from pathlib import Path

import pytest
import torch
from run_helpers import PROMPTS, read_metrics

from diffalign.cli import main
from diffalign.core.likelihood import elbo_loglik
from diffalign.objectives.online import (
    d3po_loss,
    group_advantages,
    ppo_clip_loss,
    seppo_loss,
)
from diffalign.trainers.d3po import pairs_from_label_files
from diffalign.trainers.ddpo import PerPromptStatTracker
from diffalign.trainers.online import trajectory_plan


def _args(model_dir, out, method, *extra):
    return ["train", "-", f"--model.pretrained={model_dir}", "--model.lora_rank=4", f"--method.name={method}",
            f"--method.prompts={json.dumps(PROMPTS)}", "--method.num_steps=3", "--method.guidance_scale=3.0",
            "--method.resolution=32", f"--train.output_dir={out}", "--train.learning_rate=1e-2",
            "--train.checkpointing_steps=2", *extra]


GRPO = ["--method.reward=brightness", "--method.prompts_per_epoch=2", "--method.images_per_prompt=2",
        "--train.batch_size=2"]                      # 4 trajectories per epoch: 2 optimizer steps of 2 each
D3PO = ["--method.reward=brightness", "--method.prompts_per_epoch=2", "--train.batch_size=1"]  # 2 pairs: 2 steps


# ------------------------------------------------------------------ loss maths by hand
def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 10.0])
    std1 = math.sqrt(((1 - 2.5) ** 2 + (2 - 2.5) ** 2 + (3 - 2.5) ** 2 + (4 - 2.5) ** 2) / 4)  # population std
    expected = [(x - 2.5) / (std1 + 1e-4) for x in (1, 2, 3, 4)] + [0.0] * 4
    torch.testing.assert_close(group_advantages(r, 4), torch.tensor(expected))
    # Flow-GRPO's global_std: group means, one std over all eight rewards
    mean_all = r.mean().item()
    std_all = math.sqrt(sum((x - mean_all) ** 2 for x in r.tolist()) / 8)
    expected = [(x - 2.5) / (std_all + 1e-4) for x in (1, 2, 3, 4)] + [0.0] * 4
    torch.testing.assert_close(group_advantages(r, 4, global_std=True), torch.tensor(expected))
    with pytest.raises(ValueError):
        group_advantages(r, 3)


def test_per_prompt_tracker_by_hand():
    tracker = PerPromptStatTracker(buffer_size=3, min_count=3)
    r = torch.tensor([1.0, 3.0, 5.0])
    # "a" has 2 rewards (< min_count): the batch's statistics; "b" has 1: the batch's too
    batch_mean, batch_std = 3.0, math.sqrt(8 / 3) + 1e-6
    torch.testing.assert_close(tracker.update(["a", "a", "b"], r),
                               torch.tensor([(1 - 3) / batch_std, (3 - 3) / batch_std, (5 - 3) / batch_std]))
    assert batch_mean == 3.0
    # "a" now has [1, 3, 7] (window 3): its own statistics
    out = tracker.update(["a"], torch.tensor([7.0]))
    m = (1 + 3 + 7) / 3
    s = math.sqrt(((1 - m) ** 2 + (3 - m) ** 2 + (7 - m) ** 2) / 3) + 1e-6
    torch.testing.assert_close(out, torch.tensor([(7 - m) / s]))
    # the window keeps the last 3 and its state round-trips
    tracker.update(["a"], torch.tensor([9.0]))
    assert tracker.state()["a"] == [3.0, 7.0, 9.0]
    other = PerPromptStatTracker(3, 3)
    other.load(tracker.state())
    assert other.state() == tracker.state()


def test_ppo_clip_loss_by_hand():
    logp = torch.tensor([0.0, math.log(1.5), math.log(0.5), math.log(1.5)], requires_grad=True)
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, 1.0, -7.0])  # the last is clipped to -5
    losses, ratio = ppo_clip_loss(logp, old, adv, clip_range=0.2, adv_clip_max=5.0)
    # max(-A·ρ, -A·clip(ρ)): ρ=1 → -1; ρ=1.5, A>0 → max(-1.5, -1.2) = -1.2 (clipped: no gradient);
    # ρ=0.5, A>0 → max(-0.5, -0.8) = -0.5; ρ=1.5, A=-5 → max(7.5, 6.0) = 7.5
    torch.testing.assert_close(losses, torch.tensor([-1.0, -1.2, -0.5, 7.5]))
    torch.testing.assert_close(ratio, torch.tensor([1.0, 1.5, 0.5, 1.5]))
    losses.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([-1.0, 0.0, -0.5, 7.5]))  # d(-Aρ)/dlogp = -Aρ


def test_d3po_clamp_by_hand():
    beta, eps = 0.1, 0.1
    logp_w = torch.tensor([math.log(1.2), math.log(1.05)], requires_grad=True)  # ratio 1.2 → clamped to 1.1
    logp_l = torch.tensor([math.log(0.95), math.log(0.7)], requires_grad=True)  # ratio 0.7 → clamped to 0.9
    zeros = torch.zeros(2)
    losses, logits, r_w, r_l = d3po_loss(logp_w, logp_l, zeros, zeros, beta=beta, eps=eps)
    z = torch.tensor([beta * (math.log(1.1) - math.log(0.95)), beta * (math.log(1.05) - math.log(0.9))])
    torch.testing.assert_close(logits, z)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(z))
    torch.testing.assert_close(r_w, torch.tensor([1.1, 1.05]))
    torch.testing.assert_close(r_l, torch.tensor([0.95, 0.9]))
    losses.sum().backward()
    # dL/dlog r = ∓β(1 − σ(z)) inside the band; 0 where the clamp is active
    s = torch.sigmoid(z)
    torch.testing.assert_close(logp_w.grad, torch.tensor([0.0, -beta * (1 - s[1].item())]))
    torch.testing.assert_close(logp_l.grad, torch.tensor([beta * (1 - s[0].item()), 0.0]))
    # at the first step the policy is the reference: ratio 1, loss log 2
    loss0, *_ = d3po_loss(zeros, zeros, zeros, zeros)
    torch.testing.assert_close(loss0, torch.full((2,), math.log(2)))


def test_seppo_anchor_flip_by_hand():
    beta = 10.0
    # pair 0: the policy denoises the winner better than the reference → the reference sample is a loser
    # pair 1: worse → the reference sample is treated as a winner (the contrastive term flips)
    policy = torch.tensor([0.10, 0.30, 0.50, 0.40], requires_grad=True)   # [w0, w1, l0, l1]
    ref = torch.tensor([0.20, 0.20, 0.45, 0.45])
    (pw, pl), (rw, rl) = elbo_loglik(policy).chunk(2), elbo_loglik(ref).chunk(2)  # ELBO log-likelihoods
    losses, logits, flipped = seppo_loss(pw, pl, rw, rl, beta=beta)
    assert flipped.tolist() == [False, True]
    dw = torch.tensor([0.10 - 0.20, 0.30 - 0.20])
    dl = torch.tensor([0.50 - 0.45, 0.40 - 0.45])
    z = -0.5 * beta * (dw - torch.tensor([1.0, -1.0]) * dl)
    torch.testing.assert_close(logits, z)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(z))
    losses.sum().backward()
    assert policy.grad[3] > 0  # flipped: lowering the reference sample's error lowers the loss
    assert policy.grad[2] < 0  # not flipped: raising it lowers the loss
    _, _, never = seppo_loss(pw.detach(), pl.detach(), rw, rl, beta=beta, anchor_flip=False)
    assert not never.any()


def test_trajectory_plan_covers_every_unit_once_per_step():
    g = torch.Generator().manual_seed(0)
    steps = torch.tensor([0, 1, 2, 3, 5])
    plan = trajectory_plan(7, batch_size=2, grad_accum=2, steps=steps, fraction=0.5, generator=g)
    k = int(5 * 0.5)
    assert [len(step) for step in plan] == [2 * k, 2 * k]  # 4 minibatches of ≤2, 2 per optimizer step
    units = torch.cat([m.units for step in plan for m in step[::k]])
    assert sorted(units.tolist()) == list(range(7))
    per_unit = {}
    for step in plan:
        for m in step:
            for u, s in zip(m.units.tolist(), m.steps.tolist()):
                per_unit.setdefault(u, []).append(s)
    assert all(len(v) == k and len(set(v)) == k and set(v) <= set(steps.tolist()) for v in per_unit.values())


def test_human_label_files(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text('{"group": 0, "scores": [1, 0, 0]}\n{"group": 1, "scores": [0, 0, 0]}\n')
    b.write_text('{"group": 0, "scores": [0, 0, 1]}\n{"group": 1, "scores": [0, 1, 0]}\n')
    pairs = pairs_from_label_files([str(a), str(b)], num_groups=2, group=3)
    # averaged: group 0 = [.5, 0, .5] → (0 over 1), (2 over 1); group 1 = [0, .5, 0] → (4 over 3), (4 over 5)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 1), (2, 1), (4, 3), (4, 5)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"group": 0, "scores": [1, 0, 0]}\n{"group": 1, "scores": [1, null, 0]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: field 'scores'"):
        pairs_from_label_files([str(bad)], num_groups=2, group=3)


# ------------------------------------------------------------------ tiny-model runs
def test_grpo_run_writes_the_run_and_lora_loads_in_diffusers(tiny_models, tmp_path):
    from diffusers import DiffusionPipeline

    out = tmp_path / "run"
    assert main(_args(tiny_models["sd"], out, "grpo", *GRPO, "--train.max_steps=4")) == 0
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["epoch"] for r in rows] == [0, 0, 1, 1]
    assert rows[0]["ratio_max_dev"] == 0.0 and rows[0]["ratio_mean"] == 1.0  # on-policy: exactly 1
    assert rows[0]["approx_kl"] == 0.0 and rows[0]["clipfrac"] == 0.0
    assert {"reward_mean", "advantage_abs_mean", "lr", "loss", "grad_norm", "rollout_seconds"} <= set(rows[0])
    assert (out / "config.yaml").is_file()
    for step in (2, 4):
        ckpt = out / "checkpoints" / f"step-{step}"
        assert json.loads((ckpt / "trainer_state.json").read_text()) == {"epoch": step // 2, "global_step": step}
        assert (ckpt / "pytorch_lora_weights.safetensors").is_file()

    pipe = DiffusionPipeline.from_pretrained(tiny_models["sd"])
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", num_inference_steps=2, output_type="np", height=32, width=32)
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(out / "final")
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(before - after).max() > 1e-4


def test_report_to_tensorboard_logs_the_online_rows(tiny_models, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main(_args(tiny_models["sd"], out, "grpo", *GRPO, "--train.max_steps=2", "--train.checkpointing_steps=0",
                      "--train.report_to=tensorboard")) == 0
    rows = read_metrics(out)
    events = EventAccumulator(str(out / "logs" / "diffalign"), size_guidance={"scalars": 0})
    events.Reload()
    for key in ("loss", "reward_mean", "epoch"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == \
            [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-12)) for r in rows], key


def test_flow_grpo_on_sd3_with_kl(tiny_models, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny_models["sd3"], out, "flow-grpo", "--method.reward=brightness", "--method.prompts_per_epoch=1",
                 "--method.images_per_prompt=4", "--train.batch_size=4", "--method.timestep_fraction=1.0",
                 "--train.max_steps=2", "--train.gradient_accumulation_steps=1")
    assert main(args) == 0
    rows = read_metrics(out)
    assert rows[0]["ratio_max_dev"] == 0.0
    assert rows[0]["kl"] == 0.0            # the policy is the reference before any update
    assert rows[1]["kl"] > 0.0
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_pref_grpo_rewards_are_win_rates(tiny_models, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_models["sd"], out, "pref-grpo", "--method.reward=brightness", "--method.prompts_per_epoch=2",
                      "--method.images_per_prompt=3", "--train.batch_size=3", "--train.max_steps=1")) == 0
    row = read_metrics(out)[0]
    assert row["ratio_max_dev"] == 0.0 and 0 < row["win_rate_std"] <= 0.5


def _count_denoiser_calls(backbone):
    calls = []
    handle = backbone.raw_denoiser.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls, handle


@pytest.mark.parametrize("method, extra, per_micro", [("grpo", GRPO, 1), ("d3po", D3PO, 1)])
def test_stored_log_probs_are_reused(tiny_models, tmp_path, method, extra, per_micro):
    """Before any update the rollout's log-probs serve as the old policy (PPO) and as the reference
    (D3PO): one denoiser call per micro-batch, none for the reference; the ratio is exactly 1."""
    from diffalign.trainers.loop import setup
    from diffalign.trainers.online import epoch_plans, online_step, run_rollout
    from diffalign.trainers.registry import load_recipe

    args = _args(tiny_models["sd"], tmp_path / "run", method, *extra, "--train.max_steps=4")
    run = setup(load_recipe(None, [a.removeprefix("--") for a in args[2:]]))
    rollout = run_rollout(run)
    plan = epoch_plans(run, rollout)[0]
    calls, handle = _count_denoiser_calls(run.backbone)
    try:
        row = online_step(run, rollout, plan[0])
    finally:
        handle.remove()
    assert len(calls) == per_micro * len(plan[0])
    assert row["ratio_max_dev"] == 0.0
    if method == "d3po":
        # epoch 0 was sampled by the base model: its stored log-probs stay the reference's, even after an update
        calls, handle = _count_denoiser_calls(run.backbone)
        try:
            online_step(run, rollout, plan[1])
        finally:
            handle.remove()
        assert len(calls) == len(plan[1])
        assert torch.equal(rollout.tensors["ref_log_probs"], rollout.traj.log_probs)
        # the next rollout comes from the trained policy: the reference (LoRA off) runs once per
        # transition, then its log-prob is cached
        run.epoch = 1
        rollout = run_rollout(run)
        assert torch.isnan(rollout.tensors["ref_log_probs"]).all()
        micros = epoch_plans(run, rollout)[0][0]
        for expected in (2, 1):
            calls, handle = _count_denoiser_calls(run.backbone)
            try:
                for m in micros:
                    run.method.loss(rollout, m)
            finally:
                handle.remove()
            assert len(calls) == expected * len(micros)


def test_d3po_reference_after_an_update_is_the_base_model(tiny_models, tmp_path):
    out = tmp_path / "run"
    assert main(_args(tiny_models["sd"], out, "d3po", *D3PO, "--train.max_steps=4")) == 0
    rows = read_metrics(out)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # ratio 1: −log σ(0)
    assert rows[0]["ratio_max_dev"] == 0.0
    assert rows[2]["epoch"] == 1 and rows[2]["ratio_max_dev"] > 0  # epoch 1: the trained policy vs the base


def test_d3po_human_labels_two_phase(tiny_models, tmp_path):
    out, rollout_dir = tmp_path / "run", tmp_path / "to_label"
    common = _args(tiny_models["sd"], out, "d3po", "--method.labels=file", f"--method.rollout_dir={rollout_dir}",
                   "--method.prompts_per_epoch=2", "--method.images_per_prompt=3", "--train.batch_size=2",
                   "--train.max_steps=2")
    assert main(common) == 0
    assert not (out / "final").exists()
    rows = [json.loads(line) for line in (rollout_dir / "labels.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[0]["scores"] == [None] * 3
    assert all((rollout_dir / im).is_file() for r in rows for im in r["images"])
    for r, scores in zip(rows, ([2, 1, 0], [0, 0, 1])):
        r["scores"] = scores
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(common + [f"--method.label_files=[{labels}]"]) == 0
    got = read_metrics(out)
    assert len(got) == 2 and got[0]["labelled_pairs"] == 5.0  # 3 pairs + 2 pairs with unequal scores
    # sampled by the base model: stored log-probs are the reference's. The rollout was sampled as one batch of 6
    # in phase 1 and is re-evaluated in micro-batches of 2 here: CPU BLAS sums by batch shape, so equal to ~1e-7
    assert got[0]["ratio_max_dev"] < 1e-5
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_seppo_pool_and_checkpoint(tiny_models, pair_parquet, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    args = _args(tiny_models["sd"], out, "seppo", f"--data.source={pair_parquet}", "--data.resolution=32",
                 "--method.steps_per_epoch=2", "--method.beta=500", "--train.batch_size=2", "--train.max_steps=6",
                 "--method.reference_selection=latest")
    assert main(args) == 0
    rows = read_metrics(out)
    assert [r["reference_epoch"] for r in rows] == [0, 0, 1, 1, 2, 2]  # latest: the checkpoint after each epoch
    assert [r["pool_size"] for r in rows] == [1, 1, 2, 2, 3, 3]
    assert rows[0]["flip_frac"] == 0.0  # reference == policy at first: no reference sample counts as a winner
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    ckpt = out / "checkpoints" / "step-4"
    assert json.loads((ckpt / "seppo_pool.json").read_text()) == [0, 1]
    pool = load_file(ckpt / "seppo_pool.safetensors")
    assert {k.split("/")[0] for k in pool} == {"0", "1"} and any("lora_B" in k for k in pool)


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("grpo", GRPO), ("seppo", None)])
def test_resume_latest_gives_the_same_weights(tiny_models, pair_parquet, tmp_path, method, extra):
    from safetensors.torch import load_file

    if extra is None:
        extra = [f"--data.source={pair_parquet}", "--data.resolution=32", "--method.steps_per_epoch=2",
                 "--method.beta=500", "--train.batch_size=2"]
    common = ["--train.lr_scheduler=constant", *extra]
    unbroken = tmp_path / "a"
    assert main(_args(tiny_models["sd"], unbroken, method, *common, "--train.max_steps=6")) == 0
    stopped = tmp_path / "b"
    assert main(_args(tiny_models["sd"], stopped, method, *common, "--train.max_steps=4")) == 0
    assert main(_args(tiny_models["sd"], stopped, method, *common, "--train.max_steps=6", "--resume", "latest")) == 0
    wa = load_file(unbroken / "final" / "pytorch_lora_weights.safetensors")
    wb = load_file(stopped / "final" / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    assert [r["step"] for r in read_metrics(stopped)] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in read_metrics(stopped)] == pytest.approx([r["loss"] for r in read_metrics(unbroken)], abs=1e-6)


def test_bad_options_are_clear_errors(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="needs a reward"):
        main(_args(tiny_models["sd"], tmp_path / "r", "grpo", "--train.max_steps=1"))
    with pytest.raises(ValueError, match="images_per_prompt >= 2"):
        main(_args(tiny_models["sd"], tmp_path / "r", "grpo", "--method.reward=brightness",
                   "--method.images_per_prompt=1", "--train.max_steps=1"))
    with pytest.raises(ValueError, match="deterministic"):
        main(_args(tiny_models["sd"], tmp_path / "r", "ddpo", "--method.reward=brightness", "--method.eta=0.0",
                   "--train.max_steps=1"))


# ------------------------------------------------------------------ recipes, bench
REPO = Path(__file__).resolve().parents[2]


def _online_recipes() -> dict[str, object]:
    from diffalign.trainers.registry import load_recipe, methods

    names = set(methods("online"))
    recipes = {p.name: load_recipe(p) for p in sorted((REPO / "pipelines").glob("*.yaml")) if not p.name.startswith("eval-")}
    return {name: r for name, r in recipes.items() if r.method.get("name") in names}


def test_every_online_method_has_a_recipe_with_valid_options():
    from diffalign.eval.prompts import prompts_fields
    from diffalign.rewards import list_rewards
    from diffalign.trainers import METHODS
    from diffalign.trainers.registry import methods

    recipes = _online_recipes()
    assert set(methods("online")) <= {r.method["name"] for r in recipes.values()}
    assert {"shapes-grpo.yaml", "shapes-ddpo.yaml", "shapes-d3po.yaml", "shapes-seppo.yaml"} <= set(recipes)
    for name, recipe in recipes.items():
        spec = dict(recipe.method)
        config = METHODS[spec.pop("name")].config_class(**spec)
        reward = getattr(config, "reward", None)
        if reward:
            assert set(reward if isinstance(reward, dict) else {reward: 1}) <= set(list_rewards()), name
        if getattr(config, "reference_images", None) and config.prompts == "references":
            assert config.reference_images.endswith(".json"), f"{name}: Adv-GRPO's prompts are its references'"
        elif getattr(config, "winners", None) != "data":
            prompts_fields(config.prompts)
        else:
            assert recipe.data.source, f"{name}: SePPO's winners come from the data section"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["shapes-grpo.yaml", "shapes-ddpo.yaml", "shapes-d3po.yaml", "shapes-seppo.yaml"])
def test_shapes_online_recipes_train_on_the_bundled_model(recipe, tmp_path):
    out = tmp_path / "run"
    small = {"shapes-grpo.yaml": ["--method.images_per_prompt=2", "--train.batch_size=4"],
             "shapes-ddpo.yaml": ["--method.prompts_per_epoch=4", "--train.batch_size=4"],
             "shapes-d3po.yaml": ["--method.prompts_per_epoch=2", "--train.batch_size=2"],
             "shapes-seppo.yaml": ["--method.steps_per_epoch=1", "--train.batch_size=2"]}[recipe]
    assert main(["train", str(REPO / "pipelines" / recipe), "--method.num_steps=3", "--train.max_steps=1",
                 f"--train.output_dir={out}", "--train.checkpointing_steps=0", *small]) == 0
    row = read_metrics(out)[0]
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_bench_times_rollouts_and_updates_of_an_online_recipe(tiny_models, tmp_path):
    result = tmp_path / "bench.json"
    args = _args(tiny_models["sd"], tmp_path / "unused", "grpo", *GRPO)
    assert main(["bench", *args[1:], "--steps", "3", "--warmup", "1", "--json", str(result)]) == 0
    r = json.loads(result.read_text())
    assert r["mode"] == "online" and r["method"] == "grpo"
    assert r["rollout_trajectories"] == 4 and r["trajectories_per_s"] > 0
    assert r["steps"] == 3 and r["steps_per_s"] > 0 and r["units_per_step"] == 2 and r["peak_memory_mb"] > 0
