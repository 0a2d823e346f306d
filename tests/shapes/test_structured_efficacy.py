"""Efficacy on the Shapes world for the inversion and structured-preference methods (InPO, SmPO,
RankDPO, TPO): trained briefly from the bundled base model on oracle-labelled data, each raises the
held-out oracle win rate over base; the same run on flipped labels lowers it. InPO, SmPO and TPO
train on the bundled candidates (each prompt's best and worst of 4 base samples; SmPO with the
oracle utilities as scores); RankDPO on lists of 4 fresh base samples for 200 of those prompts,
ranked by the oracle. TPO must raise ShapesEval (it learns captions, not image quality) and is then
judged by the oracle like the others (its ShapesEval control stayed above base: general training on
Shapes images lifts single-object scores whatever the captions); its control prefers the perturbed captions (training it on the worst images instead is no control: it
still teaches which caption fits an image, and raised ShapesEval as much).

Opt-in like ``test_efficacy.py`` (DIFFALIGN_EFFICACY=1): each method trains two LoRAs and samples the
held-out set three times; on a loaded 2-core CPU that is tens of minutes per method.
"""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from diffalign.eval.generate import generate
from diffalign.shapes.demo import Candidates, compare_images, heldout_eval_set, load_base_pipeline, preference_rows
from diffalign.shapes.oracle import Oracle
from diffalign.trainers.config import load_recipe
from diffalign.trainers.loop import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("DIFFALIGN_EFFICACY") != "1",
                       reason="Shapes efficacy runs are opt-in: set DIFFALIGN_EFFICACY=1"),
]

ROOT = Path(__file__).resolve().parents[2]
CANDIDATES = ROOT / "datasets" / "shapes-candidates" / "candidates.parquet"
EVAL_PER_TASK, EVAL_SEEDS = 12, 2  # 144 held-out images
STEPS = {"num_inference_steps": 20, "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def world():
    torch.manual_seed(0)
    base = load_base_pipeline()
    eval_prompts, eval_seeds = heldout_eval_set(EVAL_PER_TASK, EVAL_SEEDS)
    base_imgs = generate(base, [p.text for p in eval_prompts], eval_seeds, **STEPS)
    return SimpleNamespace(candidates=Candidates.load(CANDIDATES), eval_prompts=eval_prompts, eval_seeds=eval_seeds,
                           base_imgs=base_imgs)


def scored_rows(candidates: Candidates, *, flip: bool) -> list[dict]:
    """The oracle-labelled pairs with each image's noise-free utility as score_0/score_1 (SmPO); the
    control scores ``1 − u`` (and flips the label)."""
    rows = preference_rows(candidates, Oracle(noise=0.1, seed=0), flip=flip)
    judge = Oracle(noise=0.0)
    for row, prompt in zip(rows, candidates.prompts):
        from diffalign.data.pairs import decode_image

        for j in (0, 1):
            u = judge.utility(decode_image(row[f"jpg_{j}"], "candidate"), prompt)
            row[f"score_{j}"] = 1.0 - u if flip else u
    return rows


RANKED_PROMPTS, RANKED_K = 200, 4


def ranked_records(world, *, flip: bool) -> list[dict]:
    """Lists of ``RANKED_K`` fresh base samples per prompt, ranked by noise-free oracle utility (control:
    ``1 − u``, the reversed ranking)."""
    from diffalign.shapes.demo import sample_candidates
    from diffalign.shapes.oracle import to_jpeg_bytes

    if not hasattr(world, "lists"):
        world.lists = sample_candidates(load_base_pipeline(), world.candidates.prompts[:RANKED_PROMPTS],
                                        images_per_prompt=RANKED_K, seed=0, progress=None)
    records = []
    for prompt, group, utils in zip(world.lists.prompts, world.lists.images, world.lists.utilities):
        scores = [1.0 - u if flip else u for u in utils]
        records.append({"caption": prompt.text, "images": [to_jpeg_bytes(im) for im in group],
                        "names": [str(i) for i in range(len(group))], "scores": scores,
                        "ranking": sorted(range(len(group)), key=lambda i: -scores[i]), "rewards": {}})
    return records


def train_and_compare(world, tmp: Path, recipe: str, overrides: list[str], *, flip: bool, scores: bool = False):
    if recipe == "shapes-tpo.yaml" and flip:  # TPO's labels are caption preferences: flip those
        overrides, flip = [*overrides, "method.flip_labels=true"], False
    from diffalign.data.label import write_ranked
    from diffalign.data.pickapic import write_pickapic_parquet

    tmp.mkdir(parents=True, exist_ok=True)
    data = tmp / "train.parquet"
    if recipe == "shapes-rankdpo.yaml":
        write_ranked(ranked_records(world, flip=flip), data)
    else:
        rows = (scored_rows(world.candidates, flip=flip) if scores
                else preference_rows(world.candidates, Oracle(noise=0.1, seed=0), flip=flip))
        write_pickapic_parquet(rows, data)
    recipe = load_recipe(ROOT / "pipelines" / recipe, [f"data.source={data}", f"train.output_dir={tmp / 'run'}",
                                                       "train.seed=0", "train.checkpointing_steps=100000", *overrides])
    run_dir = train(recipe)
    aligned = load_base_pipeline()
    aligned.load_lora_weights(run_dir / "final")
    imgs = generate(aligned, [p.text for p in world.eval_prompts], world.eval_seeds, **STEPS)
    return compare_images(world.base_imgs, imgs, world.eval_prompts), imgs


# method -> (recipe, overrides, SmPO scores, metric)
METHODS = {
    "inpo": ("shapes-inpo.yaml", [], False, "oracle"),
    "tpo": ("shapes-tpo.yaml", [], False, "shapes_eval"),
    "rankdpo": ("shapes-rankdpo.yaml", [], False, "oracle"),
    "smpo": ("shapes-smpo.yaml", [], True, "oracle"),
}


def _overall(shapes_eval: dict) -> float:
    return float(shapes_eval["overall"]) if "overall" in shapes_eval else float(
        sum(shapes_eval.values()) / len(shapes_eval))


@pytest.mark.parametrize("method", list(METHODS))
def test_training_raises_the_heldout_metric_and_flipped_labels_lower_it(world, tmp_path, method):
    recipe, overrides, scores, metric = METHODS[method]
    aligned, aligned_imgs = train_and_compare(world, tmp_path / "labels", recipe, overrides, flip=False, scores=scores)
    control, control_imgs = train_and_compare(world, tmp_path / "flipped", recipe, overrides, flip=True, scores=scores)
    report = {"aligned": aligned, "control": control}
    print(f"\n{method}: {report}")
    if metric == "shapes_eval":  # TPO: its own target, ShapesEval, must rise; then the oracle as for the others
        base, tuned = _overall(aligned["shapes_eval"]["base"]), _overall(aligned["shapes_eval"]["aligned"])
        assert tuned > base, f"{method}: ShapesEval base {base:.3f}, aligned {tuned:.3f}"
    if metric in ("oracle", "shapes_eval"):
        rate, (lo, hi) = aligned["oracle_win_rate"]["aligned_over_base"], aligned["oracle_win_rate"]["ci95"]
        assert lo > 0.5, f"{method}: held-out win rate over base {rate:.3f} (95% CI {lo:.3f}–{hi:.3f}) not above 0.5"
        c_rate = control["oracle_win_rate"]["aligned_over_base"]
        assert c_rate < 0.5, f"{method} on flipped labels: win rate over base {c_rate:.3f}"
        d_rate, d_lo, d_hi = Oracle(noise=0.0).win_rate(aligned_imgs, control_imgs, world.eval_prompts)
        assert d_lo > 0.5, f"{method}: labels over flipped labels {d_rate:.3f} (95% CI {d_lo:.3f}–{d_hi:.3f})"
