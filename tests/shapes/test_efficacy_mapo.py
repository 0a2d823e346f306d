"""Efficacy on the Shapes world, MaPO (``pipelines/shapes-mapo.yaml``, as it is): trained from the bundled
base model on the same oracle-labelled pairs as Diffusion-DPO, it raises the oracle's held-out win rate
over base significantly, and it beats the same run on flipped labels significantly (``efficacy_helpers``).

The flipped-label control is not asserted to fall below base: MaPO's ``L_w`` term fine-tunes the model on
its own samples whichever way the labels point, and that alone does not cost it against base. On the
build machine: aligned 0.583 over base (95% CI 0.524-0.642; ShapesEval 0.285 -> 0.389), flipped labels
0.507 (0.441-0.585; ShapesEval 0.396, so the fidelity gain is that fine-tuning's, not the labels'),
aligned over flipped 0.615 (0.557-0.666). With training seed 1: aligned 0.597 (0.520-0.669), flipped 0.517,
aligned over flipped 0.649 (0.595-0.697). 600 steps of 4 pairs put the control below base at seed 0
(0.469) but not at seed 1 (0.549, aligned 0.507), so this recipe stays (README, Shapes table).
"""

import pytest
from efficacy_helpers import assert_labels_beat_flipped_labels, labels_and_flipped_runs

pytestmark = [pytest.mark.slow, pytest.mark.slow_cost(9)]


def test_mapo_raises_the_heldout_win_rate_and_beats_its_flipped_label_control(world, tmp_path):
    runs = labels_and_flipped_runs(world, tmp_path, "shapes-mapo.yaml")
    assert_labels_beat_flipped_labels("mapo", world, *runs, control_below_base=False)
