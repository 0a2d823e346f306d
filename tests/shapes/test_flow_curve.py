"""The Shapes miniature of the flow methods' headline curve, shortened: DiffusionNFT from the bundled flow base,
rewarded by ShapesEval on the grammar's train split, raises held-out ShapesEval (unseen combinations) with a paired
95% CI above zero (slow).

What the full run measured (`diffalign shapes curve pipelines/shapes-diffusion-nft.yaml train.max_steps=80
--eval-every 10 --per-task 10`, one CPU thread; README): 0.200 at base, 0.433 after 30 steps (9.3 training
minutes). This test is its first 30 steps, evaluated once.
"""

import json

import pytest

from diffalign.shapes.curve import curve

pytestmark = [pytest.mark.slow, pytest.mark.slow_cost(9)]


def test_diffusion_nft_raises_heldout_shapes_eval_on_the_flow_base(tmp_path):
    result = curve("shapes-diffusion-nft", ["train.max_steps=30"], eval_every=30, per_task=10, out=tmp_path)
    base, last = result["rows"][0], result["rows"][-1]
    assert [r["step"] for r in result["rows"]] == [0, 30]
    diff = result["last_vs_base"]
    print(f"\nflow curve: {json.dumps({'base': base['overall'], 'step_30': last['overall'], **diff})}")
    assert diff["diff_ci95"][0] > 0, diff  # significantly up on held-out combinations
    assert (last["vs_base"], last["vs_base_ci95"]) == (diff["mean_diff"], list(diff["diff_ci95"]))  # each row: its CI
    assert last["overall"] - base["overall"] >= 0.1, (base, last)
    assert json.loads((tmp_path / "curve.json").read_text())["rows"] == result["rows"]
