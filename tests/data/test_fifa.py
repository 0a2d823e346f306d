"""FiFA: the selection objective, the k-NN entropy, the budget, and `diffalign data fifa` end to end."""

import itertools
import json
import math
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from data_helpers import BLUE, GREEN, RED, jpeg

from diffalign.cli import main
from diffalign.data.fifa import (
    budget_size,
    fifa_filter,
    importance_scores,
    knn_distances,
    knn_entropy,
    pair_margins,
    parse_budget,
    select_top,
    set_objective,
)
from diffalign.shapes.grammar import parse_prompt, scene_for_prompt
from diffalign.shapes.scene import Scene, render

EULER = 0.5772156649015329


# ---------------------------------------------------------------------------- k-NN entropy


def test_knn_distances_and_entropy_by_hand():
    # points 0, 1, 3, 7 on a line: nearest-neighbour distances 1, 1, 2, 4
    emb = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    assert knn_distances(emb, 1).tolist() == [1.0, 1.0, 2.0, 4.0]
    assert knn_distances(emb, 2).tolist() == [3.0, 2.0, 3.0, 6.0]
    # psi(4) - psi(1) = 1 + 1/2 + 1/3; V_1 = 2; (d/N) sum log rho = (log 2 + log 4) / 4
    psi4 = 1 + 1 / 2 + 1 / 3 - EULER
    expected = psi4 + EULER + math.log(2) + (math.log(2) + math.log(4)) / 4
    assert knn_entropy(emb, 1) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(11 / 6 + 1.75 * math.log(2))


def test_knn_entropy_of_a_gaussian_and_a_uniform():
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(4000, 2, generator=g, dtype=torch.float64)
    assert knn_entropy(gauss, 5) == pytest.approx(math.log(2 * math.pi * math.e), abs=0.08)  # 2.838
    uniform = torch.rand(4000, 1, generator=g, dtype=torch.float64) * 4  # U[0, 4]: entropy log 4
    assert knn_entropy(uniform, 5) == pytest.approx(math.log(4), abs=0.05)
    # spreading the points out raises the estimate by d·log(scale)
    assert knn_entropy(gauss * 3, 5) - knn_entropy(gauss, 5) == pytest.approx(2 * math.log(3), abs=1e-9)


def test_knn_distances_in_blocks_equal_the_full_matrix():
    emb = torch.randn(37, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full = torch.cdist(emb, emb) + torch.diag(torch.full((37,), float("inf"), dtype=torch.float64))
    for k in (1, 4):
        expected = full.sort(dim=1).values[:, k - 1]
        # (cdist rounds by block shape: equal to float64 precision, not bitwise)
        assert torch.allclose(knn_distances(emb, k, block_entries=40), expected, rtol=0, atol=1e-12)  # 1 row a block
        assert torch.allclose(knn_distances(emb, k, block_entries=370), expected, rtol=0, atol=1e-12)  # 10 rows


def test_knn_needs_more_points_than_k():
    with pytest.raises(ValueError, match="k < N"):
        knn_distances(torch.zeros(3, 2), 3)


# ---------------------------------------------------------------------------- the objective


def _toy():
    """Six pairs: 0, 1, 2 have close prompt embeddings (0.3 apart) and the largest margins (2, 2.1, 1.9);
    3, 4, 5 are spread out with smaller margins (1, 0.4, 0.4)."""
    f64 = {"dtype": torch.float64}
    margins = pair_margins(torch.tensor([3.0, 1.0, 2.9, 1.0, 0.4, 2.0], **f64),
                           torch.tensor([1.0, 3.1, 1.0, 0.0, 0.0, 1.6], **f64))
    quality = torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 0.0], **f64)
    emb = torch.tensor([[1.0, 0.0], [1.0, 0.3], [1.0, -0.3], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]], **f64)
    return margins, quality, emb


def test_margins_abs_and_signed():
    m = pair_margins(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 3.0]))
    assert m.tolist() == [2.0, 2.0]
    assert pair_margins(torch.tensor([3.0, 1.0]), torch.tensor([1.0, 3.0]), "signed").tolist() == [2.0, -2.0]


def test_importance_score_by_hand():
    margins, quality, emb = _toy()
    s = importance_scores(margins, quality, emb, alpha=2.0, gamma=0.5, k=1)
    # pair 4 at (-1, 0): nearest others at distance sqrt(2) -> 0.4 + 2*1.0 + 0.5*log(sqrt 2)
    assert float(s[4]) == pytest.approx(0.4 + 2.0 + 0.5 * math.log(math.sqrt(2)), abs=1e-9)
    # pair 0 at (1, 0): nearest other at distance 0.3 -> 2.0 + 0 + 0.5*log(0.3)
    assert float(s[0]) == pytest.approx(2.0 + 0.5 * math.log(0.3), abs=1e-9)


@pytest.mark.parametrize("alpha,gamma,k", [(0.0, 0.0, 1), (1.0, 0.0, 1), (1.0, 0.5, 1), (2.0, 1.0, 2)])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_top_k_is_the_brute_force_optimum_of_the_surrogate(alpha, gamma, k, size):
    margins, quality, emb = _toy()
    s = importance_scores(margins, quality, emb, alpha=alpha, gamma=gamma, k=k)
    best = max(itertools.combinations(range(6), size), key=lambda c: float(s[list(c)].sum()))
    assert select_top(s, size) == list(best)


def test_without_diversity_top_k_is_the_exact_optimum_of_the_paper_objective():
    margins, quality, emb = _toy()
    s = importance_scores(margins, quality, emb, alpha=1.0, gamma=0.0)
    for size in range(1, 7):
        best = max(itertools.combinations(range(6), size),
                   key=lambda c: set_objective(c, margins, quality, emb, alpha=1.0, gamma=0.0))
        assert select_top(s, size) == list(best)


def test_diversity_trades_margin_for_distinct_prompts():
    margins, _, emb = _toy()
    # margins alone: the three close prompts 0, 1, 2 (margins 2, 2.1, 1.9)
    assert select_top(importance_scores(margins, None, emb, gamma=0.0), 3) == [0, 1, 2]
    # with the diversity term (k=1, gamma=1): scores m + log rho = 2 + log 0.3, 2.1 + log 0.3, 1.9 + log 0.3,
    # 1 + log sqrt(1.09) (pair 3: nearest pair 1 at (1, 0.3)) -> pair 3 (1.199) replaces pair 2 (0.696)
    chosen = select_top(importance_scores(margins, None, emb, gamma=1.0, k=1), 3)
    assert chosen == [0, 1, 3]
    # the paper's set objective agrees that this beats the margin-only choice
    objective = lambda s: set_objective(s, margins, None, emb, gamma=1.0, k=1)
    assert objective(chosen) > objective([0, 1, 2])
    # and the surrogate is an approximation: the set optimum (brute force) is [1, 2, 3] (1 and 2 are
    # 0.6 apart within that subset, a larger entropy than 0 and 1 at 0.3)
    assert max(itertools.combinations(range(6), 3), key=objective) == (1, 2, 3)


def test_ties_in_score_keep_the_earlier_row():
    assert select_top(torch.tensor([1.0, 2.0, 2.0, 2.0]), 2) == [1, 2]


# ---------------------------------------------------------------------------- the budget


def test_budget():
    assert budget_size(0.2, 10) == 2
    assert budget_size(0.25, 10) == 3  # 2.5 rounds half up
    assert budget_size(0.01, 10) == 1  # at least one pair
    assert budget_size(1.0, 10) == 10
    assert budget_size(5, 3) == 3 and budget_size(5, 100) == 5
    assert budget_size(0.5, 0) == 0
    for bad in (0, -1, 0.0, 1.5, True, "0.2"):
        with pytest.raises(ValueError):
            budget_size(bad, 10)
    assert parse_budget("0.2") == 0.2 and isinstance(parse_budget("5000"), int)
    assert parse_budget("20%") == pytest.approx(0.2) and parse_budget("1e-2") == 0.01
    with pytest.raises(ValueError, match="--budget"):
        parse_budget("a fifth")


# ---------------------------------------------------------------------------- end to end


def _pairs_file(path, rows):
    cols = {k: [r[k] for r in rows] for k in rows[0]}
    types = {"jpg_0": pa.binary(), "jpg_1": pa.binary(), "caption": pa.string(), "label_0": pa.float64(),
             "score_0": pa.float64(), "score_1": pa.float64(), "user_id": pa.int64()}
    pq.write_table(pa.table({k: pa.array(v, types[k]) for k, v in cols.items()}), path, row_group_size=3)
    return path


def test_cli_keeps_the_largest_margins_with_every_column(tmp_path, capsys):
    colors = [RED, BLUE, GREEN]
    rows = []
    margins = [0.1, 3.0, 0.0, 1.0, 2.0, 0.5, 4.0, 0.2]
    for i, m in enumerate(margins):
        label = 0.5 if i == 2 else float(i % 2)  # row 2 is a tie; odd rows: image 0 wins
        w, lo = (1.0 + m, 1.0) if label == 1.0 else (1.0, 1.0 + m)  # score_0, score_1 agreeing with the label
        rows.append({"jpg_0": jpeg(colors[i % 3]), "jpg_1": jpeg(colors[(i + 1) % 3]), "caption": f"prompt {i}",
                     "label_0": label, "score_0": w, "score_1": lo, "user_id": 100 + i})
    src = _pairs_file(tmp_path / "in.parquet", rows)
    out = tmp_path / "sub" / "kept.parquet"
    assert main(["data", "fifa", str(src), str(out), "--budget", "3", "--gamma", "0", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["rows"] == 8 and stats["ties"] == 1 and stats["candidates"] == 7 and stats["kept"] == 3
    table = pq.read_table(out)
    assert table.column_names == pq.read_table(src).column_names
    kept = table.to_pylist()
    assert [r["user_id"] for r in kept] == [101, 104, 106]  # margins 3, 2, 4, in input order
    assert kept[0]["jpg_0"] == rows[1]["jpg_0"] and kept[2]["caption"] == "prompt 6"
    assert stats["mean_margin_kept"] == pytest.approx(3.0)
    # a fraction: 0.5 of 7 untied pairs = 4 (3.5 rounds up)
    assert main(["data", "fifa", str(src), str(out), "--budget", "50%", "--gamma", "0"]) == 0
    assert "kept 4 of 7 pairs" in capsys.readouterr().out
    assert [r["user_id"] for r in pq.read_table(out).to_pylist()] == [101, 103, 104, 106]


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    rows = [{"jpg_0": jpeg(RED), "jpg_1": jpeg(BLUE), "caption": f"p{i}", "label_0": 1.0, "score_0": 1.0,
             "score_1": 0.0, "user_id": i} for i in range(8)]
    src = _pairs_file(tmp_path / "in.parquet", rows)
    quality = tmp_path / "q.json"
    quality.write_text(json.dumps({"p0": 1.0}))
    out = tmp_path / "out.parquet"
    assert main(["data", "fifa", str(src), str(out), "--budget", "0.5", "--gamma", "0", "--quality", str(quality)]) == 1
    assert "no entry for 7 prompt(s)" in capsys.readouterr().err
    # the diversity term needs a text tower: score columns alone have none
    assert main(["data", "fifa", str(src), str(out), "--budget", "0.5"]) == 1
    assert "--text-encoder" in capsys.readouterr().err
    no_scores = tmp_path / "no_scores.parquet"
    pq.write_table(pq.read_table(src).drop(["score_0", "score_1"]), no_scores)
    assert main(["data", "fifa", str(no_scores), str(out), "--budget", "0.5", "--gamma", "0"]) == 1
    err = capsys.readouterr().err
    assert "score_0" in err and "--reward" in err
    assert not out.exists() and not list(tmp_path.glob(".out.parquet.*"))


def test_filter_scores_with_a_reward_and_embeds_with_its_text_tower(tmp_path):
    """Shapes pairs scored by the bundled Shapes CLIP; prompts embedded by its text tower; the output's
    score columns are the reward's scores."""
    from diffalign.rewards import load_reward

    rng = random.Random(0)
    prompts = ["a photo of a red square", "a photo of a blue circle", "a photo of two circles",
               "a photo of a red square", "a photo of a green circle", "a photo of three circles"]
    rows = []
    for i, p in enumerate(prompts):
        good = render(scene_for_prompt(parse_prompt(p), rng))
        bad = render(Scene([]))
        b0, b1 = (_png(good), _png(bad)) if i % 2 == 0 else (_png(bad), _png(good))
        rows.append({"jpg_0": b0, "jpg_1": b1, "caption": p, "label_0": 1.0 if i % 2 == 0 else 0.0, "user_id": i})
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), src)
    reward = load_reward("shapes-clip")
    out = tmp_path / "out.parquet"
    stats = fifa_filter(src, out, budget=0.5, reward=reward, k=2)
    assert stats.kept == 3 and stats.candidates == 6
    kept = pq.read_table(out).to_pylist()
    with torch.no_grad():
        for r in kept:
            s = reward.score([_open(r["jpg_0"]), _open(r["jpg_1"])], [r["caption"]] * 2)
            assert [r["score_0"], r["score_1"]] == pytest.approx(s.tolist(), abs=1e-4)
    # the same choice from stored score columns, with the reward's text tower passed explicitly
    again = tmp_path / "again.parquet"
    scored = tmp_path / "scored.parquet"
    full = pq.read_table(src)
    all_scores = [reward.score([_open(r["jpg_0"]), _open(r["jpg_1"])], [r["caption"]] * 2).tolist() for r in rows]
    full = full.append_column("score_0", pa.array([s[0] for s in all_scores], pa.float64()))
    full = full.append_column("score_1", pa.array([s[1] for s in all_scores], pa.float64()))
    pq.write_table(full, scored)
    fifa_filter(scored, again, budget=0.5, text_encoder=reward.encode_text, k=2)
    assert [r["user_id"] for r in pq.read_table(again).to_pylist()] == [r["user_id"] for r in kept]


def _png(im) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _open(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data)).convert("RGB")
