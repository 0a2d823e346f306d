"""The one method registry: every method registered where it is defined, routed by its kind."""

import dataclasses
import subprocess
import sys

import pytest

from diffalign.trainers.registry import (
    KINDS,
    build_method,
    get_method,
    methods,
    register_method,
    run_recipe,
)

EXPECTED_KINDS = {
    "offline": {"diffusion-dpo", "mapo", "kto", "sft", "inpo", "inversion-dpo", "smpo", "rankdpo", "dcpo", "tpo",
                "ppd"},
    "online": {"ddpo", "grpo", "flow-grpo", "pref-grpo", "d3po", "seppo", "flow-grpo-fast", "mixgrpo", "grpo-guard",
               "diffusion-nft", "awm", "dgpo", "prdp", "adv-grpo"},
    "backprop": {"alignprop", "draft", "draft-lv", "refl"},
    "video": {"densedpo"},
    "text": {"text-sft", "text-dpo", "text-kto", "text-simpo", "text-orpo"},
}


def test_every_method_is_registered_once_with_its_config_and_kind():
    found = methods()
    assert {k: set(methods(k)) for k in KINDS} == EXPECTED_KINDS
    assert set(found) == set().union(*EXPECTED_KINDS.values())
    for name, entry in found.items():
        assert dataclasses.is_dataclass(entry.config_class), name
        cls = entry.method_class
        assert (cls.name, cls.config_class, cls.kind) == (name, entry.config_class, entry.kind)
        entry.config_class()  # every option has a default
    assert len({e.method_class for e in found.values()}) == len(found)


def test_the_package_names_read_the_registry():
    from diffalign.trainers import METHODS, DiffusionDPO, MaPOConfig, TextDPO

    assert METHODS == {n: e.method_class for n, e in methods().items()}
    assert METHODS["diffusion-dpo"] is DiffusionDPO and get_method("mapo").config_class is MaPOConfig
    assert METHODS["text-dpo"] is TextDPO  # image and text methods share the registry


def test_register_method_refuses_an_unknown_kind_and_a_taken_name():
    with pytest.raises(ValueError, match="unknown method kind 'rl'"):
        register_method("x", object, kind="rl")
    with pytest.raises(ValueError, match="'mapo' is taken"):
        register_method("mapo", object, kind="offline")(type("Other", (), {}))
    assert get_method("mapo").method_class.__name__ == "MaPO"


@pytest.mark.parametrize("name, model_hook, steps_hook", [
    ("diffusion-dpo", None, None), ("grpo", None, "rollout_steps"), ("draft", None, None),
    ("densedpo", "DenseDPO.load_model", None), ("text-dpo", "TextMethod.load_model", None)])
def test_every_kind_runs_on_the_one_loop_through_its_hooks(name, model_hook, steps_hook, monkeypatch):
    from diffalign.trainers import loop
    from diffalign.trainers.registry import load_recipe

    cls = get_method(name).method_class
    loader = getattr(cls, "load_model", loop.load_backbone_for_training)
    assert (loader is loop.load_backbone_for_training) == (model_hook is None)
    if model_hook:
        assert loader.__qualname__ == model_hook
    steps = getattr(cls, "steps", None)
    assert (steps is None) == (steps_hook is None)  # None: the engine's data_steps
    monkeypatch.setattr(loop, "train", lambda recipe: ("ran", recipe.method["name"]))
    assert run_recipe(load_recipe(None, [f"method.name={name}"])) == ("ran", name)


def test_build_method_builds_the_typed_config():
    method = build_method({"name": "mapo", "beta": 1}, backbone=None)
    assert method.config == get_method("mapo").config_class(beta=1.0) and isinstance(method.config.beta, float)


def _run(code: str) -> None:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


def test_importing_the_package_imports_no_method_and_scoring_no_trainer():
    _run("import sys; import diffalign.trainers, diffalign.trainers.config\n"
         "loaded = sorted(m for m in sys.modules if m.startswith(('diffalign.trainers.', 'diffalign.text')))\n"
         "assert loaded == ['diffalign.trainers.config'], loaded\n"
         "assert 'torch' not in sys.modules")
    # the registry is where the methods load, all of them (it is what `diffalign train` imports)
    _run("import sys; import diffalign.trainers.registry\n"
         "assert {'diffalign.trainers.dpo', 'diffalign.trainers.loop', 'diffalign.text.methods'} <= set(sys.modules)")
    _run("import sys; from diffalign.cli import main\n"
         "try: main(['score', '--help'])\n"
         "except SystemExit: pass\n"
         "assert not [m for m in sys.modules if m.startswith('diffalign.trainers')], 'score imported the trainers'")
