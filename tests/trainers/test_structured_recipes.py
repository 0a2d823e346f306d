"""The recipes of InPO, Inversion-DPO, SmPO, RankDPO, DCPO and TPO parse and build their method config."""

from pathlib import Path

import pytest

from diffalign.trainers import METHODS
from diffalign.trainers.registry import load_recipe

PIPELINES = Path(__file__).resolve().parents[2] / "pipelines"
NAMES = ("inpo", "inversion-dpo", "smpo", "rankdpo", "dcpo", "tpo")
RECIPES = sorted(p.name for p in PIPELINES.glob("*.yaml")
                 if any(p.stem.endswith("-" + n) for n in NAMES))


def test_every_method_has_recipes():
    for n in NAMES:
        found = [r for r in RECIPES if r.endswith(f"-{n}.yaml")]
        assert any(r.startswith(("sd15-", "sd21-")) for r in found) and any(r.startswith("sdxl-") for r in found), n


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_builds_its_method_config(name):
    recipe = load_recipe(PIPELINES / name)
    spec = dict(recipe.method)
    cls = METHODS[spec.pop("name")]
    cls.config_class(**spec)
    assert (recipe.data.format == "ranked") == (cls.data_kind == "ranked")
    if not recipe.model.pretrained.startswith("bundled:"):
        assert recipe.model.pretrained.count("/") == 1  # a hub id as users type it
