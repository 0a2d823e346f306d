"""Efficacy of PRDP and Adv-GRPO on the Shapes world (slow; the protocol of test_online_efficacy.py).

Each method is trained briefly from the bundled Shapes base model on train-split prompts. Held-out prompt
combinations are then sampled with fixed seeds through plain diffusers (DDIM 8 steps, CFG 5), base vs
base + LoRA. The paired bootstrap 95% CI of the held-out brightness difference must exclude 0: above it for
the run, below it for its control.

* PRDP: the reward is the brightness; the control negates it.
* Adv-GRPO has no reward model, only reference images. They are base-model samples of the train prompts
  (DDIM η = 1, as the rollouts) made paler, ``1 − 0.75·(1 − x)``; the control's are made darker,
  ``1 − 1.25·(1 − x)``. The discriminator (the bundled Shapes CLIP's vision tower + a head) learns to tell
  them from the generations, and GRPO on its reward should move the held-out brightness toward the
  references'.
"""

import json

import pytest
import torch
from test_online_efficacy import GUIDANCE, STEPS, _check, _pipeline, _train, heldout  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.slow_cost(6)]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_prdp_raises_the_heldout_reward_and_the_negated_reward_lowers_it(heldout, tmp_path):  # noqa: F811
    """PRDP: 4 epochs of 2 prompts × 8 images (η = 1), one update each over both groups' 56 pairs at 4 of
    the 8 steps; β = 1e-3, ε = 1e-4."""
    common = ["method.prompts_per_epoch=2", "method.images_per_prompt=8", "method.eta=1.0",
              "method.timestep_fraction=0.5", "method.num_inner_epochs=1", "method.beta=1e-3",
              "method.clip_range=1e-4", "train.batch_size=1", "train.gradient_accumulation_steps=2",
              "train.max_steps=4", "train.learning_rate=3e-3"]
    runs = {1: _train(tmp_path / "run", "prdp", "method.reward=brightness", *common),
            -1: _train(tmp_path / "control", "prdp", "method.reward={brightness: -1.0}", *common)}
    _check("PRDP", runs, heldout)


def _references(folder, sign: int):
    """A references.json of base samples of the train prompts, paler (sign +1) or darker (−1)."""
    from diffalign.eval.generate import generate
    from diffalign.rewards.base import to_pil, to_tensor
    from diffalign.shapes.grammar import prompt_set

    prompts = [p.text for p in prompt_set("train", 4, seed=0)]
    images = generate(_pipeline(), prompts, [777 + i for i in range(len(prompts))], num_inference_steps=STEPS,
                      guidance_scale=GUIDANCE, eta=1.0)
    x = (1 - (1 - to_tensor(images)) * (1 - sign * 0.25)).clamp(0, 1)
    folder.mkdir(parents=True)
    mapping = {}
    for i, (prompt, im) in enumerate(zip(prompts, to_pil(x))):
        im.save(folder / f"{i}.png")
        mapping.setdefault(prompt, []).append(f"{i}.png")
    (folder / "references.json").write_text(json.dumps(mapping))
    return folder / "references.json"


def test_adv_grpo_moves_the_heldout_reward_toward_its_references(heldout, tmp_path):  # noqa: F811
    """Adv-GRPO: 16 epochs alternating (d_times 2) between 10 head steps and one GRPO step on 2 prompts ×
    16 images (η = 1, 4 of 8 steps)."""
    common = ["method.prompts=references", "method.features=bundled:shapes-clip-reward",
              "method.feature_mean=[0.5, 0.5, 0.5]", "method.feature_std=[0.5, 0.5, 0.5]",
              "method.prompts_per_epoch=2", "method.images_per_prompt=16", "method.eta=1.0",
              "method.timestep_fraction=0.5", "method.d_times=2", "method.d_steps=10", "method.d_lr=3e-3",
              "method.clip_range=1e-4", "method.advantage=group", "train.batch_size=32", "train.max_steps=8",
              "train.learning_rate=5e-3"]
    runs = {sign: _train(tmp_path / f"run{sign}", "adv-grpo",
                         f"method.reference_images={_references(tmp_path / f'refs{sign}', sign)}", *common)
            for sign in (1, -1)}
    _check("Adv-GRPO", runs, heldout)
