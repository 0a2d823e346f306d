import re
from pathlib import Path

import pytest
import yaml

from diffalign.trainers import build_method
from diffalign.trainers.config import ConfigError
from diffalign.trainers.dpo import DiffusionDPOConfig
from diffalign.trainers.registry import load_recipe


def test_overrides_parse_yaml_values(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {pretrained: a/b}\nmethod: {name: diffusion-dpo, beta: 5000}\ntrain: {max_steps: 10}\n")
    r = load_recipe(path, ["train.max_steps=3", "method.beta=2500.5", "train.validation_prompts=[x, y]",
                           "model.lora_target_modules=null"])
    assert r.train.max_steps == 3 and r.method["beta"] == 2500.5
    assert r.train.validation_prompts == ["x", "y"] and r.model.pretrained == "a/b"
    r.save(tmp_path / "config.yaml")
    assert load_recipe(tmp_path / "config.yaml").train.max_steps == 3  # the written config round-trips


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_step'\] in section 'train'"):
        load_recipe(None, ["train.max_step=3"])
    with pytest.raises(ValueError, match="unknown method 'dpo2'"):
        build_method({"name": "dpo2"}, backbone=None)
    with pytest.raises(ValueError, match="bad option for method 'mapo'"):
        build_method({"name": "mapo", "gamma": 1}, backbone=None)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_recipe("nope.yaml")


def test_loss_type_list_with_weights():
    cfg = DiffusionDPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.25])
    assert cfg.terms() == [("sigmoid", 1.0), ("sft", 0.25)]
    with pytest.raises(ValueError, match="must match"):
        DiffusionDPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0]).terms()
    with pytest.raises(ValueError, match="unknown loss type 'orpo'"):
        DiffusionDPOConfig(loss_type="orpo").terms()


# ---------------------------------------------------------------- typed method configs at load time
REPO = Path(__file__).resolve().parents[2]
DPO_OPTIONS = ("beta", "label_smoothing", "loss_type", "loss_weights")


def test_unknown_method_option_fails_at_load_with_the_known_options(tmp_path, monkeypatch):
    """``--method.bta=1`` is an error when the recipe loads, before any model loads (the model path
    does not exist, so loading it first would be a different error), and lists the known options."""
    import diffalign.models

    monkeypatch.setattr(diffalign.models, "load_backbone", lambda *a, **k: pytest.fail("a model was loaded"))
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['bta'\]") as err:
        load_recipe(None, [f"model.pretrained={missing}", "method.bta=1"])
    assert "method 'diffusion-dpo'" in str(err.value)
    assert all(name in str(err.value) for name in DPO_OPTIONS)
    with pytest.raises(ValueError, match=r"known options: beta, snr_value"):  # ConfigError is a ValueError
        load_recipe(None, ["method.name=mapo", "method.gamma=1"])
    with pytest.raises(ConfigError, match="known options: .*max_length"):  # text methods: the same registry
        load_recipe(None, ["method.name=text-dpo", "method.bta=1"])


def test_unknown_method_option_fails_in_diffalign_train_before_the_model(tmp_path, capsys):
    from diffalign.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{pretrained: {tmp_path / 'no-such-model'}}}\nmethod: {{name: diffusion-dpo}}\n"
                      f"train: {{output_dir: {tmp_path / 'run'}}}\n")
    assert main(["train", str(recipe), "--method.bta=1"]) == 2  # a config error: one line, exit 2
    assert re.search(r"unknown option\(s\) \['bta'\].*known options: beta", capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # nothing half-written
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['bta'\]"):  # the model was never loaded
        main(["train", str(recipe), "--method.bta=1", "--debug"])


def test_method_section_is_the_typed_config_and_reads_like_a_dict():
    r = load_recipe(None, ["method.name=diffusion-dpo", "method.beta=2500"])
    assert isinstance(r.method.config, DiffusionDPOConfig) and r.method.config.beta == 2500.0
    assert isinstance(r.method["beta"], float)  # YAML's int, coerced to the field's type
    assert r.method["name"] == "diffusion-dpo" and r.method.get("loss_type") == "sigmoid"
    assert r.method.get("no-such-option", 7) == 7
    assert dict(r.method) == {"name": "diffusion-dpo", "beta": 2500.0, "loss_type": "sigmoid",
                              "loss_weights": None, "label_smoothing": 0.0}
    assert load_recipe(None).method["name"] == "diffusion-dpo"  # the default method


def test_config_yaml_holds_every_default(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {pretrained: a/b}\nmethod: {name: kto, beta: 1000}\n")
    load_recipe(path).save(tmp_path / "config.yaml")
    written = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert written["method"] == {"name": "kto", "beta": 1000.0, "desirable_weight": 1.0, "undesirable_weight": 1.0,
                                 "paired_noise": False}
    assert written["train"]["max_steps"] == 1000 and written["data"]["caption_dropout"] == 0.0
    assert load_recipe(tmp_path / "config.yaml").to_dict() == load_recipe(path).to_dict()  # round-trips


@pytest.mark.parametrize("override, message", [
    ("method.beta=0", r"method 'diffusion-dpo' option beta must be > 0, not 0"),
    ("method.beta=-5000", r"option beta must be > 0"),
    ("method.label_smoothing=1.5", r"option label_smoothing must be in \[0, 1\], not 1.5"),
    ("data.caption_dropout=1.2", r"data.caption_dropout must be in \[0, 1\], not 1.2"),
    ("data.caption_dropout=-0.1", r"data.caption_dropout must be in \[0, 1\]"),
    ("train.max_steps=0", r"train.max_steps must be > 0, not 0"),
    ("train.batch_size=0", r"train.batch_size must be > 0"),
    ("train.gradient_accumulation_steps=-1", r"train.gradient_accumulation_steps must be > 0"),
    ("train.learning_rate=0", r"train.learning_rate must be > 0"),
    ("train.learning_rate=-1e-5", r"train.learning_rate must be > 0"),
    ("method.beta=high", r"option beta must be a number, not 'high'"),
    ("method.loss_type=1", r"option loss_type must be str or list\[str\], not 1"),
    ("train.max_steps=2.5", r"train.max_steps must be an integer, not 2.5"),
    ("train.max_steps=ten", r"train.max_steps must be a number, not 'ten'"),
    ("model.lora_rank=-1", r"model.lora_rank must be >= 0"),
    ("train.validation_prompts=a prompt", r"train.validation_prompts must be a list"),
])
def test_bad_values_are_one_config_error_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, [override])


@pytest.mark.parametrize("method, override, message", [
    ("kto", "method.paired_noise=maybe", r"option paired_noise must be true or false, not 'maybe'"),
    ("grpo", "method.timestep_fraction=0", r"option timestep_fraction must be in \(0, 1\], not 0"),
    ("grpo", "method.images_per_prompt=0", r"option images_per_prompt must be > 0"),
    ("grpo", "method.kl_beta=-0.1", r"option kl_beta must be >= 0"),
    ("d3po", "method.beta=0", r"method 'd3po' option beta must be > 0"),
    ("inpo", "method.num_inversion_steps=0", r"option num_inversion_steps must be > 0"),
    ("alignprop", "method.truncation_mean=2", r"option truncation_mean must be in \[0, 1\]"),
    ("text-dpo", "method.max_length=0", r"method 'text-dpo' option max_length must be > 0"),
    ("text-simpo", "method.beta=-2", r"method 'text-simpo' option beta must be > 0"),
])
def test_bad_method_values_per_method(method, override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(None, [f"method.name={method}", override])


def test_unknown_method_is_a_config_error_listing_the_methods():
    with pytest.raises(ConfigError, match=r"unknown method 'dpo3'; choose from \[.*'diffusion-dpo'.*'text-dpo'"):
        load_recipe(None, ["method.name=dpo3"])


def test_good_values_are_kept_and_coerced():
    r = load_recipe(None, ["method.name=grpo", "method.eta=null", "method.timestep_fraction=1",
                           "train.learning_rate=1e-5",
                           "data.caption_dropout=1", "method.reward={pickscore: 1}"])
    assert r.method["eta"] is None and r.method["timestep_fraction"] == 1.0 and r.train.learning_rate == 1e-5
    assert r.data.caption_dropout == 1.0 and r.method["reward"] == {"pickscore": 1.0}


TRAINING_RECIPES = sorted(p.name for p in (REPO / "pipelines").glob("*.yaml") if not p.name.startswith("eval-"))


@pytest.mark.parametrize("path", TRAINING_RECIPES)
def test_every_bundled_recipe_loads_typed_and_round_trips(path, tmp_path):
    from diffalign.trainers.registry import get_method

    recipe = load_recipe(REPO / "pipelines" / path)
    entry = get_method(recipe.method["name"])
    assert isinstance(recipe.method.config, entry.config_class)
    recipe.save(tmp_path / "config.yaml")
    assert load_recipe(tmp_path / "config.yaml").to_dict() == recipe.to_dict()
