"""Efficacy of the on-line trainers on the Shapes world (slow; run in CI).

Each method is trained briefly from the bundled Shapes base model on train-split prompts and scored on
held-out prompt combinations (``prompt_set("heldout", ...)``) with fixed seeds through plain diffusers
(base vs base + LoRA, DDIM 8 steps, CFG 5). The paired bootstrap 95% CI of the held-out reward
difference (:func:`diffalign.eval.compare.paired_comparison`, resampling prompts) must exclude 0:
above it for the run, below it for its sign-flipped control.

* GRPO and D3PO: the reward is the image brightness (the registered ``brightness``, mean luma), an
  easy reward the LoRA moves within a minute on a CPU; the control negates it.
* SePPO has no reward model: its only signal is its winning images. The winners are base samples
  of train prompts made warmer (red +0.15, blue −0.15) and the reward is the warmth
  ``mean(R − B)``; the control's winners are made cooler. (Brightness does not serve here: pushing
  away from the model's own samples, the losers, brightens the images whatever the winners, and that
  drift is larger than a brightness-selected winner's signal.)
"""

import io

import pytest
import torch

STEPS = 8          # sampler steps, in training and in the held-out evaluation
GUIDANCE = 5.0
PER_TASK = 4       # held-out prompts per task: 24 prompts, one fixed seed each

pytestmark = [pytest.mark.slow, pytest.mark.slow_cost(6)]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pipeline(lora=None):
    from diffusers import StableDiffusionPipeline

    from diffalign.shapes.model import base_model_path

    pipe = StableDiffusionPipeline.from_pretrained(base_model_path())
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return pipe


def _brightness(pipe, prompts, seeds) -> list[float]:
    from diffalign.eval.generate import generate
    from diffalign.rewards import load_reward

    images = generate(pipe, prompts, seeds, num_inference_steps=STEPS, guidance_scale=GUIDANCE)
    return load_reward("brightness").score(images, prompts).tolist()


@pytest.fixture(scope="module")
def heldout():
    """The held-out prompts, their seeds and the base model's rewards (shared by every test here)."""
    from diffalign.shapes.grammar import prompt_set

    prompts = [p.text for p in prompt_set("heldout", PER_TASK, seed=1)]
    seeds = list(range(len(prompts)))
    return prompts, seeds, _brightness(_pipeline(), prompts, seeds)


def _train(out, method: str, *overrides: str):
    from diffalign.trainers import run_recipe
    from diffalign.trainers.registry import load_recipe

    recipe = load_recipe(None, [
        "model.pretrained=bundled:shapes-sd-base", "model.lora_rank=4", f"method.name={method}",
        "method.prompts=shapes", "method.prompt_options={split: train, n_per_task: 20}", f"method.num_steps={STEPS}",
        f"method.guidance_scale={GUIDANCE}", "train.seed=0", "train.checkpointing_steps=0",
        "train.lr_scheduler=constant", f"train.output_dir={out}", *overrides])
    return run_recipe(recipe)


def _check(name, runs: dict, heldout):
    from diffalign.eval.compare import paired_comparison

    prompts, seeds, base = heldout
    results = {}
    for sign, out in runs.items():
        scores = _brightness(_pipeline(out / "final"), prompts, seeds)
        results[sign] = r = paired_comparison(scores, base, groups=prompts, n_boot=2000, seed=0)
        print(f"{name} ({'run' if sign > 0 else 'sign-flipped control'}): held-out brightness {r['mean_b']:.4f} -> "
              f"{r['mean_a']:.4f}, diff {r['mean_diff']:+.4f} (95% CI {r['diff_ci95'][0]:+.4f}..{r['diff_ci95'][1]:+.4f}), "
              f"win rate {r['win_rate']:.2f}, n={r['n']}")
    assert results[1]["diff_ci95"][0] > 0, f"{name} did not raise the held-out reward: {results[1]}"
    assert results[-1]["diff_ci95"][1] < 0, f"{name}'s sign-flipped control did not lower it: {results[-1]}"


def test_grpo_raises_the_heldout_reward_and_the_negated_reward_lowers_it(heldout, tmp_path):
    """GRPO: 4 epochs of 2 prompts × 8 images (η = 1), one optimizer step each on half of each
    trajectory's steps."""
    common = ["method.prompts_per_epoch=2", "method.images_per_prompt=8", "method.eta=1.0",
              "method.timestep_fraction=0.5", "train.batch_size=16", "train.max_steps=4", "train.learning_rate=3e-3"]
    runs = {1: _train(tmp_path / "run", "grpo", "method.reward=brightness", *common),
            -1: _train(tmp_path / "control", "grpo", "method.reward={brightness: -1.0}", *common)}
    _check("GRPO", runs, heldout)


def test_d3po_raises_the_heldout_reward_and_the_negated_reward_lowers_it(heldout, tmp_path):
    """D3PO: 4 epochs of 16 pairs (η = 1, shared initial noise), labelled by the reward, one optimizer
    step each on 2 of each pair's 8 steps; the reference is the base model."""
    common = ["method.prompts_per_epoch=16", "method.eta=1.0", "method.timestep_fraction=0.25", "train.batch_size=16",
              "train.max_steps=4", "train.learning_rate=5e-3"]
    runs = {1: _train(tmp_path / "run", "d3po", "method.reward=brightness", *common),
            -1: _train(tmp_path / "control", "d3po", "method.reward={brightness: -1.0}", *common)}
    _check("D3PO", runs, heldout)


def _warmth(pipe, prompts, seeds) -> list[float]:
    """``mean(R − B)`` in [−1, 1] of each 8-bit image."""
    from diffalign.eval.generate import generate
    from diffalign.rewards.base import to_tensor

    x = to_tensor(generate(pipe, prompts, seeds, num_inference_steps=STEPS, guidance_scale=GUIDANCE))
    return (x[:, 0] - x[:, 2]).mean(dim=(1, 2)).tolist()


def _tinted_winner_parquets(folder, shift: float = 0.15, n_per_task: int = 4):
    """Pick-a-Pic files whose winners are base-model samples of train prompts tinted warmer (sign +1:
    red +shift, blue −shift) or cooler (−1), the untinted sample as the other image. PNG bytes."""
    from diffalign.data.pickapic import write_pickapic_parquet
    from diffalign.eval.generate import generate
    from diffalign.rewards.base import to_pil, to_tensor
    from diffalign.shapes.grammar import prompt_set

    prompts = [p.text for p in prompt_set("train", n_per_task, seed=0)]
    images = generate(_pipeline(), prompts, [777 + i for i in range(len(prompts))], num_inference_steps=STEPS,
                      guidance_scale=GUIDANCE)

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    paths = {}
    for sign in (1, -1):
        x = to_tensor(images).clone()
        x[:, 0] = (x[:, 0] + sign * shift).clamp(0, 1)
        x[:, 2] = (x[:, 2] - sign * shift).clamp(0, 1)
        rows = [{"caption": p, "jpg_0": png(tinted), "jpg_1": png(im), "label_0": 1.0}
                for p, tinted, im in zip(prompts, to_pil(x), images)]
        paths[sign] = folder / f"winners{sign}.parquet"
        write_pickapic_parquet(rows, paths[sign])
    return paths


def test_seppo_moves_the_heldout_reward_toward_its_winners(heldout, tmp_path):
    """SePPO: winners tinted warmer (the control: cooler); losers are samples of a previous checkpoint
    (drawn at random among the earlier ones); 3 epochs of 4 steps of 8 pairs. β = 50: at the SD1.5
    default of 5000 one step at this learning rate moves the logits by ~10 and the run turns chaotic."""
    from diffalign.eval.compare import paired_comparison

    prompts, seeds, _ = heldout
    base = _warmth(_pipeline(), prompts, seeds)
    parquets = _tinted_winner_parquets(tmp_path)
    common = ["data.resolution=64", "method.winners=data", "method.steps_per_epoch=4", "method.beta=50",
              "train.batch_size=8", "train.max_steps=12", "train.learning_rate=3e-3"]
    results = {}
    for sign, path in parquets.items():
        out = _train(tmp_path / f"run{sign}", "seppo", f"data.source={path}", *common)
        results[sign] = r = paired_comparison(_warmth(_pipeline(out / "final"), prompts, seeds), base, groups=prompts,
                                              n_boot=2000, seed=0)
        print(f"SePPO ({'warmer' if sign > 0 else 'cooler'} winners): held-out warmth {r['mean_b']:.4f} -> "
              f"{r['mean_a']:.4f}, diff {r['mean_diff']:+.4f} (95% CI {r['diff_ci95'][0]:+.4f}..{r['diff_ci95'][1]:+.4f})")
    assert results[1]["diff_ci95"][0] > 0, f"SePPO did not move toward warmer winners: {results[1]}"
    assert results[-1]["diff_ci95"][1] < 0, f"SePPO did not move toward cooler winners: {results[-1]}"
