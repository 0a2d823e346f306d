"""Efficacy on the Shapes world: offline preference methods, trained briefly from the bundled base
model on oracle-labelled pairs, raise the oracle's held-out win rate over base; the same run on
flipped labels lowers it.

Held-out means unseen prompt combinations (the grammar's held-out split) and fresh seeds. The
training candidates are the bundled ``datasets/shapes-candidates`` (the demo's own 400 prompts × 4
samples of the bundled base model, best and worst kept; made by ``diffalign shapes candidates``, and
checked against a fresh sample in test_demo.py), so the tests spend their time on training. The base model's
held-out images are made once for all methods; each test trains one LoRA and samples the held-out set.
"""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffalign.eval.generate import generate
from diffalign.shapes.demo import (
    RECIPE,
    Candidates,
    compare_images,
    heldout_eval_set,
    load_base_pipeline,
    preference_rows,
    write_preference_data,
)
from diffalign.shapes.oracle import Oracle
from diffalign.trainers.config import load_recipe
from diffalign.trainers.loop import train

# Opt-in for now (issue #3): it passed twice on the build machine (1 torch thread: 13.5 and 17 min on a loaded
# 2-core CPU, the second after the InPO/TPO/text trainers landed), but at that cost it does not fit the suite's
# 25-minute budget next to everything else; it goes into the default run once a cheaper setting with the same
# margin is found (fewer steps at a higher learning rate, 150 at 4e-3, gave 0.566 (0.507-0.636): too thin).
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("DIFFALIGN_EFFICACY") != "1",
                       reason="Shapes efficacy runs are opt-in for now: set DIFFALIGN_EFFICACY=1 (see issue #3)"),
]

CANDIDATES = Path(__file__).resolve().parents[2] / "datasets" / "shapes-candidates" / "candidates.parquet"
EVAL_PER_TASK, EVAL_SEEDS = 12, 2  # 144 held-out images
STEPS = {"num_inference_steps": 20, "guidance_scale": 5.0}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the measured margins are those of single-threaded numerics, whatever the CPU count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(_one_thread):
    torch.manual_seed(0)
    base = load_base_pipeline()
    eval_prompts, eval_seeds = heldout_eval_set(EVAL_PER_TASK, EVAL_SEEDS)
    base_imgs = generate(base, [p.text for p in eval_prompts], eval_seeds, **STEPS)
    return SimpleNamespace(candidates=Candidates.load(CANDIDATES), eval_prompts=eval_prompts, eval_seeds=eval_seeds,
                           base_imgs=base_imgs)


def train_and_compare(world, tmp: Path, overrides: list[str], *, flip: bool) -> tuple[dict, list]:
    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "train.parquet"
    write_preference_data(preference_rows(world.candidates, Oracle(noise=0.1, seed=0), flip=flip), data)
    recipe = load_recipe(RECIPE, [f"data.source={data}", f"train.output_dir={tmp / 'run'}", "train.seed=0",
                                  "train.checkpointing_steps=100000", *overrides])
    run_dir = train(recipe)
    aligned = load_base_pipeline()
    aligned.load_lora_weights(run_dir / "final")
    imgs = generate(aligned, [p.text for p in world.eval_prompts], world.eval_seeds, **STEPS)
    return compare_images(world.base_imgs, imgs, world.eval_prompts), imgs


METHODS = {
    "diffusion-dpo": [],  # the demo's recipe as it is
    # MaPO (β 0.1) raised mean utility and ShapesEval on these candidates but its win rate over base was
    # 0.569 (0.493–0.641): not significant at this size, so it is not asserted here yet.
}


def judge_win_rate(images_a, images_b, prompts) -> tuple[float, float, float]:
    from diffalign.shapes.oracle import Oracle

    return Oracle(noise=0.0).win_rate(images_a, images_b, prompts)


@pytest.mark.parametrize("method", list(METHODS))
def test_training_raises_the_heldout_win_rate_and_flipped_labels_lower_it(world, tmp_path, method):
    aligned, aligned_imgs = train_and_compare(world, tmp_path / "labels", METHODS[method], flip=False)
    control, control_imgs = train_and_compare(world, tmp_path / "flipped", METHODS[method], flip=True)
    rate, lo, hi = aligned["oracle_win_rate"]["aligned_over_base"], *aligned["oracle_win_rate"]["ci95"]
    assert lo > 0.5, f"{method}: held-out win rate over base {rate:.3f} (95% CI {lo:.3f}–{hi:.3f}) not above 0.5"
    c_rate, c_lo, c_hi = control["oracle_win_rate"]["aligned_over_base"], *control["oracle_win_rate"]["ci95"]
    assert c_rate < 0.5, f"{method} on flipped labels: win rate over base {c_rate:.3f} ({c_lo:.3f}–{c_hi:.3f})"
    # the direction of the labels is what moves the model: the aligned model beats its control
    d_rate, d_lo, d_hi = judge_win_rate(aligned_imgs, control_imgs, world.eval_prompts)
    assert d_lo > 0.5, f"{method}: labels over flipped labels {d_rate:.3f} (95% CI {d_lo:.3f}–{d_hi:.3f})"
