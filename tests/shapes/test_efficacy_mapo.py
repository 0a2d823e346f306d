"""Efficacy on the Shapes world, MaPO (``pipelines/shapes-mapo.yaml``, as it is): trained from the bundled
base model on the same oracle-labelled pairs as Diffusion-DPO, it raises the oracle's held-out win rate
over base and held-out ShapesEval (``efficacy_helpers``).

On the build machine (training seed 0, as here): aligned 0.615 over base (95% CI 0.550-0.676; ShapesEval
0.285 -> 0.396), flipped labels 0.483 (0.418-0.556), aligned over flipped 0.691 (0.628-0.743). The control's
fall below base is small and not significant on its own: MaPO's ``L_w`` term fine-tunes the model on its
own samples whichever way the labels point (ShapesEval 0.347 on flipped labels). Other training seeds
(README, Shapes table): seed 1 aligned 0.597 (0.536-0.658), control 0.514, aligned over control 0.590
(0.532-0.642); seed 2 none of the three claims (0.531, 0.545, 0.521). What held at all three seeds, and
so is asserted (other float kernels act like another seed): aligned over base above 0.5 (0.615, 0.597,
0.531) and ShapesEval overall up by at least 0.04 (0.285 -> 0.396, 0.424, 0.354). Both hold on flipped
labels too at some seeds (ShapesEval 0.347-0.410): on this world MaPO's gain is fine-tuning on its own
samples more than its labels; the control and aligned-over-control are measured and printed, not asserted.
"""

import pytest
from efficacy_helpers import assert_labels_beat_flipped_labels, labels_and_flipped_runs

pytestmark = [pytest.mark.slow, pytest.mark.slow_cost(9)]


def test_mapo_raises_the_heldout_win_rate_and_shapes_eval(world, tmp_path):
    runs = labels_and_flipped_runs(world, tmp_path, "shapes-mapo.yaml")
    assert_labels_beat_flipped_labels("mapo", world, *runs, claims=("over_base", "shapes_eval_rises"))
