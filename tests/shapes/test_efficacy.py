"""Efficacy on the Shapes world, Diffusion-DPO (the demo's recipe as it is): trained from the bundled
base model on the oracle-labelled pairs of the bundled candidates, it raises the oracle's held-out win
rate over base; the same run on flipped labels lowers it below 0.5, and the aligned model beats that
control significantly (``efficacy_helpers``).

In the default run (issue #3). It costs ~13 min on one thread of the 2-core build machine (two 300-step
LoRA runs, two 144-image held-out samplings, and base's, shared with the other efficacy files), so it is
a file of its own for ``-n 2 --dist loadfile`` and starts first (``slow_cost``). MaPO is in
``test_efficacy_mapo.py``, Diffusion-KTO in ``test_efficacy_kto.py`` (both in the default run too).

The training seed is fixed (``train.seed=0``) and matters: with seed 1 the control (0.358) and aligned
over control (0.649, 95% CI 0.581-0.713) hold, but aligned over base is 0.545 (0.483-0.613), not
significant. Other float kernels (AVX2, AVX-512, scalar) act like another seed, so the test asserts what
held at every seed: aligned over base above 0.5 (not its significance), the control below 0.5, and aligned
over the control significantly.
"""

import pytest
from efficacy_helpers import assert_labels_beat_flipped_labels, labels_and_flipped_runs

pytestmark = [pytest.mark.slow, pytest.mark.slow_cost(13)]


def test_diffusion_dpo_raises_the_heldout_win_rate_and_flipped_labels_lower_it(world, tmp_path):
    runs = labels_and_flipped_runs(world, tmp_path, "shapes-diffusion-dpo.yaml")
    assert_labels_beat_flipped_labels("diffusion-dpo", world, *runs,
                                      claims=("over_base", "control_below_base", "over_control_significant"))
