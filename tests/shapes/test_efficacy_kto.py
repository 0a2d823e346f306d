"""Efficacy on the Shapes world, Diffusion-KTO (``pipelines/shapes-kto.yaml``, as it is: the oracle-labelled
pairs as per-image feedback, each pair's two images on one noise and timestep): the model trained from the
bundled base on the true labels beats the same run on flipped labels significantly (``efficacy_helpers``):
the labels' direction is what moves it.

On the build machine: aligned 0.681 over base (95% CI 0.591-0.765; ShapesEval 0.285 -> 0.417), flipped
labels 0.333 (0.280-0.388), aligned over flipped 0.806 (0.753-0.851). ~7 min on one thread. The training
seed is fixed and matters: with seed 1 aligned over flipped holds (0.656, 0.591-0.727) and the control is
below base (0.240), but aligned over base is 0.358 (0.299-0.432). The float kernels act like another seed:
at seed 0 under ``ATEN_CPU_CAPABILITY=default`` aligned 0.688, control 0.413, aligned over control 0.778
(0.710-0.845); under ``avx2`` aligned 0.684, control 0.542 (above base), aligned over control 0.670
(0.611-0.740). So only aligned over control, which held at every seed and kernel, is asserted; the other
two are measured and printed.
"""

import pytest
from efficacy_helpers import assert_labels_beat_flipped_labels, labels_and_flipped_runs

pytestmark = [pytest.mark.slow, pytest.mark.slow_cost(7)]


def test_kto_labels_beat_flipped_labels(world, tmp_path):
    runs = labels_and_flipped_runs(world, tmp_path, "shapes-kto.yaml")
    assert_labels_beat_flipped_labels("kto", world, *runs, claims=("over_control_significant",))
