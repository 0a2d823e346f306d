import pytest

from diffalign.trainers import build_method
from diffalign.trainers.config import load_recipe
from diffalign.trainers.dpo import DiffusionDPOConfig


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
