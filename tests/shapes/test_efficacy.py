"""Efficacy on the Shapes world: Diffusion-DPO (and MaPO, KTO) on oracle-labelled pairs from the
bundled base model raise the held-out oracle win rate over base; training on flipped labels lowers it.

One set of pairs is sampled and labelled once; each method trains on it and on its flipped copy;
base images on the held-out prompts are generated once and every model is compared on the same seeds.
"""

import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from diffalign.eval.generate import generate
from diffalign.shapes.demo import load_base_pipeline, make_preference_data
from diffalign.shapes.grammar import prompt_set, sample_prompt
from diffalign.shapes.oracle import Oracle
from diffalign.trainers.config import load_recipe
from diffalign.trainers.loop import train

pytestmark = pytest.mark.slow

TRAIN_PROMPTS = 160
EVAL_PER_TASK, EVAL_SEEDS = 12, 2       # 144 paired held-out images
SAMPLING = dict(num_inference_steps=20, guidance_scale=5.0)
METHODS = {
    "diffusion-dpo": ["method.name=diffusion-dpo"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("efficacy")
    base = load_base_pipeline()
    rng = random.Random(0)
    prompts = [sample_prompt(rng, split="train") for _ in range(TRAIN_PROMPTS)]
    data = root / "pairs.parquet"
    make_preference_data(base, prompts, data, oracle=Oracle(noise=0.0, seed=0), seed=0, **SAMPLING)
    table = pq.read_table(data)
    flipped = table.set_column(table.schema.get_field_index("label_0"), "label_0",
                               pa.array([1.0 - v for v in table.column("label_0").to_pylist()], pa.float64()))
    pq.write_table(flipped.drop(["label_1"]), root / "flipped.parquet")
    held = [p for p in prompt_set("heldout", EVAL_PER_TASK, seed=1) for _ in range(EVAL_SEEDS)]
    seeds = [10_000 + i for i in range(len(held))]
    base_imgs = generate(base, [p.text for p in held], seeds, **SAMPLING)
    return {"root": root, "held": held, "seeds": seeds, "base_imgs": base_imgs}


def _win_rate(world, method_overrides, data_name):
    out = world["root"] / f"{method_overrides[0].split('=')[1]}-{data_name}"
    recipe = load_recipe("pipelines/shapes-diffusion-dpo.yaml", [
        f"data.source={world['root'] / (data_name + '.parquet')}", f"train.output_dir={out}", *method_overrides])
    run_dir = train(recipe)
    aligned = load_base_pipeline()
    aligned.load_lora_weights(run_dir / "final")
    imgs = generate(aligned, [p.text for p in world["held"]], world["seeds"], **SAMPLING)
    return Oracle(noise=0.0).win_rate(imgs, world["base_imgs"], world["held"])


@pytest.mark.parametrize("method", list(METHODS))
def test_alignment_raises_and_flipped_control_lowers_the_oracle_win_rate(world, method):
    rate, lo, hi = _win_rate(world, METHODS[method], "pairs")
    assert lo > 0.5, f"{method}: win rate {rate:.3f} (95% CI {lo:.3f}-{hi:.3f}) not above 0.5"
    rate_f, lo_f, hi_f = _win_rate(world, METHODS[method], "flipped")
    assert hi_f < 0.5, f"{method} flipped: win rate {rate_f:.3f} (95% CI {lo_f:.3f}-{hi_f:.3f}) not below 0.5"
