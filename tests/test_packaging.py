"""What a wheel installs is enough for the demo and for recipes named without a path."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from diffalign.recipes import resolve_recipe
from diffalign.trainers.registry import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_a_bundled_recipe_is_found_by_its_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("shapes-mapo") == resolve_recipe("shapes-mapo.yaml")
    assert resolve_recipe("shapes-mapo").read_text() == (ROOT / "pipelines" / "shapes-mapo.yaml").read_text()
    assert load_recipe("shapes-mapo", ["train.max_steps=7"]).train.max_steps == 7
    (tmp_path / "shapes-mapo.yaml").write_text("train:\n  max_steps: 3\n")  # a local file comes first
    assert load_recipe("shapes-mapo.yaml").train.max_steps == 3
    with pytest.raises(FileNotFoundError, match="shapes-diffusion-dpo"):  # the message lists the bundled ones
        resolve_recipe("no-such-recipe")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_recipe("somewhere/shapes-mapo.yaml")  # a path is not looked up among the bundled recipes


def test_the_wheel_carries_the_recipes_the_demo_candidates_and_the_reward_cards(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, cwd=tmp_path)
    (wheel,) = tmp_path.glob("diffalign-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"diffalign/pipelines/{p.name}" for p in (ROOT / "pipelines").glob("*.yaml")}
    expected |= {f"diffalign/rewards/cards/{p.name}" for p in (ROOT / "reward_models").glob("*.yaml")}
    expected |= {"diffalign/shapes/assets/candidates/candidates.parquet",
                 "diffalign/shapes/assets/shapes-sd-base/model_index.json"}
    assert expected <= names, sorted(expected - names)
    files = {n: zipfile.ZipFile(wheel).getinfo(n).file_size for n in expected}
    assert files["diffalign/shapes/assets/candidates/candidates.parquet"] == (
        ROOT / "datasets" / "shapes-candidates" / "candidates.parquet").stat().st_size  # a real copy, not a link
