"""Reward-backprop trainers (AlignProp, DRaFT-K, DRaFT-LV, ReFL): runs, gradients, regulariser,
resume, processes, and efficacy on the Shapes world."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import PROMPTS, read_metrics

from diffalign.cli import main
from diffalign.trainers.backprop import (
    AlignProp,
    PromptBatch,
    PromptData,
    build_backprop_method,
    load_prompts,
)
from diffalign.trainers.registry import load_recipe, methods

METHODS = {name: entry.method_class for name, entry in methods("backprop").items()}  # the reward-backprop methods


def _args(model_dir, out, method, *extra):
    return ["train", "-", f"--model.pretrained={model_dir}", "--model.lora_rank=4", f"--method.name={method}",
            "--method.reward=brightness", f"--method.prompts={json.dumps(PROMPTS)}", "--method.num_steps=3",
            "--method.guidance_scale=3.0", "--method.resolution=32", f"--train.output_dir={out}",
            "--train.batch_size=2", "--train.learning_rate=1e-2", "--train.checkpointing_steps=2", *extra]


def _recipe(model_dir, method, *extra):
    return load_recipe(None, [a.removeprefix("--") for a in _args(model_dir, "unused", method, *extra)[2:]])


def _lora_backbone(model_dir):
    from diffalign.models import load_backbone

    backbone = load_backbone(model_dir)
    backbone.add_lora(rank=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at init would zero A's gradient; make every LoRA weight matter
        for n, p in backbone.raw_denoiser.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return backbone


def _batch(seed: int = 7) -> PromptBatch:
    return PromptBatch(PROMPTS[:2], step=0, micro=0, process=0, num_processes=1, seed=seed)


# ------------------------------------------------------------------------------------ end to end
RUNS = {  # method -> (family, extra overrides): each family's sampler path once
    "alignprop": ("sd", ["--method.truncation=uniform"]),
    "draft": ("sdxl", ["--method.k=2"]),
    "draft-lv": ("sd3", ["--method.n=2"]),
    "refl": ("sd", ["--method.pretrain_weight=0.5"]),
}


@pytest.mark.parametrize("method", list(RUNS))
def test_run_writes_the_run_dir_and_the_lora_loads_in_plain_diffusers(method, tiny_models, pair_parquet, tmp_path):
    from diffusers import DiffusionPipeline

    family, extra = RUNS[method]
    out = tmp_path / "run"
    assert main(_args(tiny_models[family], out, method, "--train.max_steps=2", f"--data.source={pair_parquet}",
                      "--data.resolution=32", *extra)) == 0
    assert (out / "config.yaml").is_file()
    assert (out / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    assert (out / "checkpoints" / "step-2" / "pytorch_lora_weights.safetensors").is_file()
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert {"loss", "lr", "reward", "reward_loss", "grad_norm", "skipped"} <= set(r)
        assert 0 <= r["reward"] <= 1 and not r["skipped"]  # brightness of images in [0, 1]
    if method == "refl":
        assert all(r["loss"] == pytest.approx(r["reward_loss"] + 0.5 * r["pretrain_loss"], rel=1e-5) for r in rows)
    if method in ("alignprop", "draft"):
        assert all(1 <= r["grad_steps"] <= 3 for r in rows)

    no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    pipe = DiffusionPipeline.from_pretrained(tiny_models[family], **no_t5)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red circle", num_inference_steps=2, output_type="np", height=32, width=32)
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(out / "final")
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(before - after).max() > 1e-4


def test_train_dispatches_backprop_methods_and_rejects_unknown_options(tiny_models, tmp_path, capsys):
    from diffalign.trainers import backprop
    from diffalign.trainers.registry import get_method

    assert set(METHODS) == {"alignprop", "draft", "draft-lv", "refl"}
    assert {get_method(m).kind for m in METHODS} == {"backprop"}
    assert all(issubclass(get_method(m).method_class, backprop.RewardBackprop) for m in METHODS)
    # config errors: one line on stderr, exit status 2, before any model loads
    assert main(_args(tiny_models["sd"], tmp_path / "x", "draft", "--method.kk=1", "--train.max_steps=1")) == 2
    assert re.search(r"unknown option.*'kk'", capsys.readouterr().err)
    assert main(_args(tiny_models["sd"], tmp_path / "y", "draft", "--method.reward_sign=2",
                      "--train.max_steps=1")) == 2
    assert "reward_sign" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ------------------------------------------------------------------------------------ gradients
@pytest.mark.parametrize("method", list(METHODS))
def test_loss_gradient_reaches_only_the_lora(method, tiny_models):
    """Through the sampler, the VAE and a learned reward (the Shapes CLIP): only LoRA weights get
    gradients; the frozen denoiser, VAE, text encoder and reward model get none."""
    from diffalign.rewards.shapes import ShapesCLIP
    from diffalign.shapes.training_data import ShapesPretrainData

    backbone = _lora_backbone(tiny_models["sd"])
    reward = ShapesCLIP.from_pretrained(mode="differentiable").requires_grad_(False)
    cls = METHODS[method]
    config = cls.config_class(num_steps=3, guidance_scale=3.0, resolution=32)
    if method == "refl":
        data = ShapesPretrainData(backbone, batch_size=2, gradient_accumulation_steps=1, seed=0, image_size=32)
        m = cls(config, backbone, reward=reward, pretrain_data=data)
    else:
        m = cls(config, backbone, reward=reward)
    out = m.loss(_batch())
    assert torch.isfinite(out.loss) and out.loss.requires_grad
    out.loss.backward()
    modules = {"denoiser": backbone.raw_denoiser, "vae": backbone.vae, "text": backbone.pipeline.text_encoder,
               "reward": reward}
    with_grad = {(k, n) for k, mod in modules.items() for n, p in mod.named_parameters() if p.grad is not None}
    assert with_grad and all(k == "denoiser" and "lora_" in n for k, n in with_grad), sorted(with_grad)[:5]
    lora = [p.grad for n, p in backbone.raw_denoiser.named_parameters() if "lora_" in n]
    assert all(g is not None for g in lora) and sum(float(g.abs().sum()) for g in lora) > 0


def test_refl_regulariser_is_present_and_weighted_as_configured(tiny_models, pair_parquet, tmp_path):
    """loss = reward loss + λ · pre-training loss, with the same reward term and data batch for every λ;
    λ = 0 drops the term; λ > 0 without a data source is an error naming the fix."""
    backbone = _lora_backbone(tiny_models["sd"])
    common = ["--method.pretrain_data=data", f"--data.source={pair_parquet}", "--data.resolution=32",
              f"--train.output_dir={tmp_path}"]
    outs = {}
    for lam in (0.0, 0.5, 2.0):
        m = build_backprop_method(_recipe(tiny_models["sd"], "refl", *common, f"--method.pretrain_weight={lam}"),
                                  backbone)
        for p in backbone.trainable_parameters():
            p.grad = None
        o = m.loss(_batch())
        o.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in backbone.trainable_parameters()])
        outs[lam] = (o, grads)
    o0, o05, o2 = outs[0.0][0], outs[0.5][0], outs[2.0][0]
    assert "pretrain_loss" not in o0.metrics and o0.loss.item() == pytest.approx(float(o0.metrics["reward_loss"]))
    pre = float(o05.metrics["pretrain_loss"])
    assert pre > 0 and float(o2.metrics["pretrain_loss"]) == pytest.approx(pre, rel=1e-6)  # same data batch
    assert float(o05.metrics["reward_loss"]) == pytest.approx(float(o0.metrics["reward_loss"]), rel=1e-6)
    assert o05.loss.item() == pytest.approx(float(o0.metrics["reward_loss"]) + 0.5 * pre, rel=1e-5)
    assert o2.loss.item() == pytest.approx(float(o0.metrics["reward_loss"]) + 2.0 * pre, rel=1e-5)
    # gradients are linear in λ: g(2) − g(0) = 4 (g(0.5) − g(0)), and the regulariser's part is not zero
    g0, g05, g2 = outs[0.0][1], outs[0.5][1], outs[2.0][1]
    assert (g05 - g0).abs().max() > 0
    torch.testing.assert_close(g2 - g0, 4 * (g05 - g0), rtol=1e-3, atol=1e-7)

    with pytest.raises(ValueError, match="data.source"):
        build_backprop_method(_recipe(tiny_models["sd"], "refl", "--method.pretrain_weight=1"), backbone)


def test_truncation_draws_and_draft_lv_copies(tiny_models):
    backbone = _lora_backbone(tiny_models["sd"])
    reward_kw = dict(num_steps=50, resolution=32, reward="brightness")
    g = torch.Generator().manual_seed(0)
    gauss = AlignProp(METHODS["alignprop"].config_class(truncation="gaussian", **reward_kw), backbone)
    ks = [gauss.draw_grad_steps(g) for _ in range(400)]
    assert all(1 <= k <= 49 for k in ks) and 6.5 < sum(ks) / len(ks) < 9.5   # T − N(42, 5): about the last 8
    uni = AlignProp(METHODS["alignprop"].config_class(truncation="uniform", **reward_kw), backbone)
    assert {uni.draw_grad_steps(g) for _ in range(2000)} == set(range(1, 51))
    full = AlignProp(METHODS["alignprop"].config_class(**reward_kw), backbone)
    assert full.draw_grad_steps(g) is None
    with pytest.raises(ValueError, match="truncation"):
        AlignProp(METHODS["alignprop"].config_class(truncation="random", **reward_kw), backbone)

    # DRaFT-LV: 1 + n images per prompt; with n = 0 it is DRaFT-1 exactly (same noise, same step)
    kw = dict(num_steps=3, guidance_scale=3.0, resolution=32, reward="brightness")
    lv = METHODS["draft-lv"](METHODS["draft-lv"].config_class(n=2, **kw), backbone)
    images, prompts, _ = lv.images(_batch())
    assert images.shape == (6, 3, 32, 32) and prompts == PROMPTS[:2] * 3 and images.requires_grad
    lv0 = METHODS["draft-lv"](METHODS["draft-lv"].config_class(n=0, **kw), backbone)
    d1 = METHODS["draft"](METHODS["draft"].config_class(k=1, **kw), backbone)
    torch.testing.assert_close(lv0.images(_batch())[0], d1.images(_batch())[0], rtol=0, atol=0)
    torch.testing.assert_close(images[:2], d1.images(_batch())[0], rtol=0, atol=0)
    assert (images[2:4] - images[:2]).abs().max() > 1e-4  # the copies are re-noised, not the sample again


# ------------------------------------------------------------------------------------ recipes, bench
REPO = Path(__file__).resolve().parents[2]


def _backprop_recipes() -> list[str]:
    """Training recipes (not ``eval-*``) whose method is a reward-backprop one."""
    return [p.name for p in sorted((REPO / "pipelines").glob("*.yaml"))
            if not p.name.startswith("eval-") and load_recipe(p).method.get("name") in METHODS]


def test_every_backprop_recipe_has_valid_options_a_registered_reward_and_prompts():
    from diffalign.eval.prompts import prompts_fields
    from diffalign.rewards import list_rewards

    assert {"shapes-draft.yaml", "shapes-refl.yaml", "sd15-alignprop.yaml", "sd15-draft-lv.yaml", "sdxl-draft.yaml",
            "sd15-refl.yaml"} <= set(_backprop_recipes())
    for name in _backprop_recipes():
        spec = dict(load_recipe(REPO / "pipelines" / name).method)
        config = METHODS[spec.pop("name")].config_class(**spec)
        rewards = config.reward if isinstance(config.reward, dict) else {config.reward: 1.0}
        assert set(rewards) <= set(list_rewards()), name
        prompts_fields(config.prompts)


@pytest.mark.parametrize("recipe", ["shapes-draft.yaml", "shapes-refl.yaml"])
def test_shapes_recipes_train_on_the_bundled_model(recipe, tmp_path):
    out = tmp_path / "run"
    assert main(["train", str(REPO / "pipelines" / recipe), "--method.num_steps=3", "--train.max_steps=1",
                 "--train.batch_size=2", f"--train.output_dir={out}", "--train.checkpointing_steps=0"]) == 0
    row = read_metrics(out)[0]
    assert 0 < row["reward"] < 1 and row["grad_norm"] > 0
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_bench_reports_training_steps_per_second(tmp_path):
    result = tmp_path / "bench.json"
    assert main(["bench", str(REPO / "pipelines" / "shapes-draft.yaml"), "--steps", "1", "--warmup", "0",
                 "--method.num_steps=2", "--train.batch_size=2", "--json", str(result)]) == 0
    r = json.loads(result.read_text())
    assert r["method"] == "draft" and r["steps_per_s"] > 0 and r["prompts_per_s"] == pytest.approx(2 * r["steps_per_s"])
    assert r["prompts_per_step"] == 2 and r["peak_memory_mb"] > 0


def test_brightness_reward_is_the_mean_luma_with_pixel_gradients():
    from diffalign.rewards import load_reward
    from diffalign.rewards.base import to_pil

    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    exact = load_reward("brightness").score(x, ["a"] * 3)
    pil_luma = torch.tensor([float(torch.tensor(list(im.convert("L").getdata()), dtype=torch.float).mean()) / 255
                             for im in to_pil(x)])
    torch.testing.assert_close(exact, pil_luma, rtol=0, atol=2 / 255)  # PIL's "L" rounds each pixel
    diff = load_reward("brightness", mode="differentiable")
    xg = x.clone().requires_grad_(True)
    diff.score(xg, ["a"] * 3).sum().backward()
    torch.testing.assert_close(xg.grad[0, :, 0, 0], torch.tensor([0.299, 0.587, 0.114]) / 64)
    target = load_reward("brightness", target=0.25).score(x, ["a"] * 3)
    torch.testing.assert_close(target, -(exact - 0.25).abs())
    with pytest.raises(ValueError, match="target"):
        load_reward("brightness", target=2.0)
    assert load_reward("brightness").card.name == "brightness"


# ------------------------------------------------------------------------------------ prompts
def test_prompt_data_is_a_function_of_the_run_position(tmp_path):
    data = PromptData(list("abcdefg"), batch_size=2, gradient_accumulation_steps=2, seed=0)
    # one epoch of 7 prompts covers each once; the same positions give the same prompts and seed
    seen = [p for pos in range(7) for p in [data.prompt_at(pos)]]
    assert sorted(seen) == list("abcdefg")
    b = data.batch(1, 1, 0, 1)
    assert b.prompts == [data.prompt_at(6), data.prompt_at(7)]
    fresh = PromptData(list("abcdefg"), batch_size=2, gradient_accumulation_steps=2, seed=0)
    assert fresh.batch(1, 1, 0, 1) == b
    # 2 processes with half the accumulation: micro 0 of process 1 is micro 1 of one process
    two = PromptData(list("abcdefg"), batch_size=2, gradient_accumulation_steps=1, seed=0)
    assert two.batch(1, 0, 1, 2).prompts == b.prompts and two.batch(1, 0, 1, 2).seed == b.seed

    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    assert load_prompts(str(txt)) == ["one", "two"]
    assert load_prompts(["x", "y"]) == ["x", "y"]
    shapes = load_prompts("shapes", {"split": "train", "n_per_task": 2})
    assert len(shapes) == 12
    with pytest.raises(ValueError, match="not a prompt set"):
        load_prompts("no-such-set")


# ------------------------------------------------------------------------------------ resume, processes
@pytest.mark.slow
def test_resume_latest_gives_the_same_weights(tiny_models, tmp_path):
    from safetensors.torch import load_file

    common = ["--train.lr_scheduler=constant", "--method.truncation=gaussian", "--method.num_steps=4"]
    unbroken = tmp_path / "a"
    assert main(_args(tiny_models["sd"], unbroken, "alignprop", "--train.max_steps=4", *common)) == 0
    stopped = tmp_path / "b"
    assert main(_args(tiny_models["sd"], stopped, "alignprop", "--train.max_steps=2", *common)) == 0
    assert main(_args(tiny_models["sd"], stopped, "alignprop", "--train.max_steps=4", "--resume", "latest",
                      *common)) == 0
    wa = load_file(unbroken / "final" / "pytorch_lora_weights.safetensors")
    wb = load_file(stopped / "final" / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)
    ra, rb = read_metrics(unbroken), read_metrics(stopped)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    assert [r["loss"] for r in rb] == pytest.approx([r["loss"] for r in ra], abs=1e-6)
    assert [r["grad_steps"] for r in rb] == [r["grad_steps"] for r in ra]


@pytest.mark.slow
def test_two_processes_match_one_with_double_accumulation(tiny_models, tmp_path):
    """DDP (gloo, CPU) with every denoiser call of the full chain checkpointed through the wrapper:
    the same samples and the same averaged gradients as one process with twice the accumulation."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    common = _args(tiny_models["sd"], "OUT", "draft", "--method.k=null", "--train.max_steps=3",
                   "--train.checkpointing_steps=0")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main([a.replace("OUT", str(one)) for a in common] + ["--train.gradient_accumulation_steps=2"]) == 0
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29531",
                    "-m", "diffalign.cli", *[a.replace("OUT", str(two)) for a in common],
                    "--train.gradient_accumulation_steps=1"], check=True, env=env)
    runs = {"one": read_metrics(one), "two": read_metrics(two)}
    for key in ("loss", "reward", "grad_norm"):
        assert [r[key] for r in runs["two"]] == pytest.approx([r[key] for r in runs["one"]], rel=1e-4, abs=1e-6)
    assert runs["one"][-1]["reward"] != pytest.approx(runs["one"][0]["reward"], abs=1e-6)  # it trained


# ------------------------------------------------------------------------------------ efficacy
EFFICACY_STEPS = 8        # sampler steps, in training and in the held-out evaluation
EFFICACY_PER_TASK = 4     # held-out prompts per GenEval-style task: 24 prompts, one fixed seed each


@pytest.mark.slow
def test_draft_raises_the_heldout_reward_and_the_sign_flipped_control_lowers_it(tmp_path):
    """DRaFT-1 from the bundled Shapes base model on train-split prompts, 6 steps of 4 prompts, with
    the differentiable brightness reward; scored on held-out prompt combinations with fixed seeds
    through plain diffusers (base vs base + LoRA). The paired bootstrap 95% CI of the reward
    difference must exclude 0: above it for the run, below it for the negated-reward control."""
    from diffusers import StableDiffusionPipeline

    from diffalign.eval.compare import paired_comparison
    from diffalign.eval.generate import generate
    from diffalign.rewards import load_reward
    from diffalign.shapes.grammar import prompt_set
    from diffalign.shapes.model import base_model_path
    from diffalign.trainers import run_recipe

    def load_base_pipeline():
        pipe = StableDiffusionPipeline.from_pretrained(base_model_path())
        pipe.set_progress_bar_config(disable=True)
        return pipe

    prompts = [p.text for p in prompt_set("heldout", EFFICACY_PER_TASK, seed=1)]
    seeds = list(range(len(prompts)))
    sampling = dict(num_inference_steps=EFFICACY_STEPS, guidance_scale=5.0)
    reward = load_reward("brightness")
    base = reward.score(generate(load_base_pipeline(), prompts, seeds, **sampling), prompts).tolist()
    results = {}
    for sign in (1, -1):
        out = tmp_path / f"sign{sign}"
        recipe = load_recipe(None, [
            "model.pretrained=bundled:shapes-sd-base", "model.lora_rank=4", "method.name=draft", "method.k=1",
            "method.reward=brightness", f"method.reward_sign={sign}", "method.prompts=shapes",
            "method.prompt_options={split: train}", f"method.num_steps={EFFICACY_STEPS}", "method.eta=0.0",
            "method.guidance_scale=5.0", "train.batch_size=4", "train.max_steps=6", "train.learning_rate=1e-3",
            "train.seed=0", "train.checkpointing_steps=0", f"train.output_dir={out}"])
        run_recipe(recipe)
        pipe = load_base_pipeline()
        pipe.load_lora_weights(out / "final")
        scores = reward.score(generate(pipe, prompts, seeds, **sampling), prompts).tolist()
        results[sign] = paired_comparison(scores, base, groups=prompts, n_boot=2000, seed=0)
    up, down = results[1], results[-1]
    for name, r in (("DRaFT-1", up), ("negated reward", down)):
        print(f"{name}: held-out brightness {r['mean_b']:.4f} -> {r['mean_a']:.4f}, diff {r['mean_diff']:+.4f} "
              f"(95% CI {r['diff_ci95'][0]:+.4f}..{r['diff_ci95'][1]:+.4f}), win rate {r['win_rate']:.2f}, n={r['n']}")
    assert up["diff_ci95"][0] > 0, f"DRaFT did not raise the held-out reward: {up}"
    assert down["diff_ci95"][1] < 0, f"the sign-flipped control did not lower it: {down}"
