"""The Shapes efficacy files' shared fixture (each file is its own xdist work unit: see efficacy_helpers)."""

import pytest
from efficacy_helpers import heldout_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The held-out world of :mod:`efficacy_helpers` (base images shared across the session's workers)."""
    return heldout_world(tmp_path_factory)
