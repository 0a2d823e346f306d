import pytest

from data_helpers import BLUE, GREEN, RED, jpeg


@pytest.fixture
def rows():
    """Pick-a-Pic rows: red always wins; one tie."""
    return [
        {"caption": "red wins (0)", "jpg_0": jpeg(RED), "jpg_1": jpeg(BLUE), "label_0": 1.0},
        {"caption": "red wins (1)", "jpg_0": jpeg(BLUE), "jpg_1": jpeg(RED), "label_0": 0.0},
        {"caption": "a tie", "jpg_0": jpeg(GREEN), "jpg_1": jpeg(BLUE), "label_0": 0.5},
    ]
