import math

import pytest
import torch
from PIL import Image
from structured_helpers import (
    assert_ln2_at_init_with_gradient,
    beta_scaled_tolerance,
    group_batch,
    move_lora,
    swap_groups,
    tiny_backbone,
)

from diffalign.core.likelihood import denoising_error
from diffalign.objectives.ranked import delta_dcg_weights
from diffalign.trainers import build_method


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return tiny_backbone(tmp_path_factory.mktemp("rankdpo") / "sd")


@pytest.fixture(scope="module")
def ranked_jsonl(tmp_path_factory):
    """Two prompts: 4 and 3 images; scores given, ranking best first."""
    from diffalign.data.label import write_ranked

    root = tmp_path_factory.mktemp("ranked")
    records = []
    for p, n in (("a red hat", 4), ("a blue cat", 3)):
        names = []
        for i in range(n):
            name = f"{p.replace(' ', '_')}_{i}.png"
            Image.new("RGB", (32, 32), (40 * i, 200 - 40 * i, 90)).save(root / name)
            names.append(name)
        scores = [0.1 * ((i * 7) % n) for i in range(n)]
        ranking = sorted(range(n), key=lambda i: -scores[i])
        records.append({"caption": p, "images": names, "names": names, "scores": scores, "ranking": ranking,
                        "rewards": {}})
    path = root / "ranked.jsonl"
    write_ranked(records, path)
    return path


def test_ranked_lists_become_rank_major_batches(backbone, ranked_jsonl, tmp_path):
    from diffalign.trainers.data import load_training_data
    from diffalign.trainers.registry import recipe_from_dict

    recipe = recipe_from_dict({"data": {"source": str(ranked_jsonl), "format": "ranked", "resolution": 32},
                               "train": {"batch_size": 2, "output_dir": str(tmp_path)}})
    data = load_training_data(recipe, "ranked", backbone, tmp_path)
    assert data.list_size == 3  # the shortest list
    batch = data.batch(0, 0, 0, 1)
    assert batch.latents.shape[0] == 6 and batch.weights.shape == (2,)
    s = batch.scores.reshape(3, 2).T  # [B, K], best first
    assert bool((s[:, :-1] >= s[:, 1:]).all())
    assert batch.prompts[0] == batch.prompts[2] == batch.prompts[4]  # one caption per list
    t = batch.timesteps.reshape(3, 2)
    assert bool((t == t[0]).all()) and torch.equal(batch.noise[0], batch.noise[2])  # shared noise and t
    with pytest.raises(ValueError, match="data.format"):
        load_training_data(recipe, "pairs", backbone, tmp_path)


def test_ln2_at_init_and_loss_by_hand(backbone):
    prompts = [["a red hat", "a dog"]] * 3
    scores = [1.0, 0.5, 0.2, 0.4, 0.0, 0.4]  # list 2 has a tie between ranks 2 and 3
    method = build_method({"name": "rankdpo", "beta": 1000.0}, backbone)
    batch = group_batch(backbone, prompts, scores=scores)
    assert_ln2_at_init_with_gradient(backbone, method.loss(batch))

    move_lora(backbone, 0.05)
    try:
        out = method.loss(batch)
        with torch.no_grad():
            lp = denoising_error(backbone.predict(batch.x_t, batch.timesteps, batch.cond), batch.target)
            with backbone.reference():
                lr = denoising_error(backbone.predict(batch.x_t, batch.timesteps, batch.cond), batch.target)
        r = (1000.0 * -0.5 * (lp - lr)).reshape(3, 2).T  # [B, K]
        gains = (2 ** torch.tensor(scores).reshape(3, 2).T) - 1
        w = delta_dcg_weights(gains)
        per_list = []
        for b in range(2):
            num = sum(float(w[b, i, j]) * math.log1p(math.exp(-(r[b, i] - r[b, j]))) for i in range(3)
                      for j in range(i + 1, 3))
            per_list.append(num / float(w[b].sum()))
        assert float(out.loss) == pytest.approx(sum(per_list) / 2, abs=beta_scaled_tolerance(1000.0, lp, lr))
        assert float(w[1, 1, 2]) == 0.0  # tied gains: that pair carries no weight
        # reversing every list (images with their scores) sends the implicit accuracy to the other side of ½
        rev = method.loss(swap_groups(batch))
        acc, rev_acc = float(out.metrics["implicit_acc"]), float(rev.metrics["implicit_acc"])
        assert (acc - 0.5) * (rev_acc - 0.5) < 0
        ranks = build_method({"name": "rankdpo", "gain": "ranks"}, backbone).loss(batch)
        assert float(ranks.loss) != float(out.loss)
    finally:
        move_lora(backbone, 0.0)


def test_needs_scores_unless_rank_gains(backbone):
    batch = group_batch(backbone, [["a red hat"]] * 3)
    with pytest.raises(ValueError, match="gain='ranks'"):
        build_method({"name": "rankdpo"}, backbone).loss(batch)
    assert float(build_method({"name": "rankdpo", "gain": "ranks"}, backbone).loss(batch).loss) == pytest.approx(
        math.log(2), abs=1e-6)
