"""A pickle payload planted where weights are read never runs, and the refusal names ``--allow-pickle`` (#21).

The payload is an object whose ``__reduce__`` creates a marker file when unpickled, i.e. what a crafted
checkpoint could do. Covered here: LoRA folders (``pytorch_lora_weights.bin``) and reward checkpoints
(``.pt`` state dicts, an HF ``pytorch_model.bin``, through ``load_reward`` and ``diffalign score``).
The same payload is planted, with the same assertions, in a training checkpoint folder
(``tests/trainers/test_train_e2e.py::test_checkpoints_hold_no_pickle_and_resume_never_unpickles``) and in a
diffusers model folder (``tests/models/test_loading.py::
test_pickled_weights_load_only_with_allow_pickle_and_a_payload_never_runs``); they are not repeated here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from diffalign.models.backbone import PickledWeightsError


class _Payload:
    """Unpickling this object creates the file ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture()
def marker(tmp_path) -> Path:
    return tmp_path / "code-ran"


def _plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": _Payload(marker)}, path)
    return path


def test_a_pickled_lora_folder_is_refused_naming_the_flag_and_never_unpickled(tmp_path, marker):
    from diffalign import testing
    from diffalign.eval.generate import load_eval_pipeline

    model = testing.make_tiny_sd(tmp_path / "sd")
    lora = _plant(tmp_path / "final" / "pytorch_lora_weights.bin", marker).parent
    for source in (lora, lora / "pytorch_lora_weights.bin"):
        with pytest.raises(PickledWeightsError, match="--allow-pickle"):
            load_eval_pipeline(str(model), lora=str(source), device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("reward,filename,kw", [
    ("hpsv2.1", "HPS_v2.1_compressed.pt", {}),
    ("imagereward", "ImageReward.pt", {}),
    ("laion-aesthetic", "sac+logos+ava1-l14-linearMSE.pth", {}),
    ("mps", "MPS_overall_checkpoint.pth", {"filename": "MPS_overall_checkpoint.pth"}),
])
def test_a_pickled_reward_checkpoint_is_refused_naming_the_flag_and_never_unpickled(reward, filename, kw, tmp_path,
                                                                                   marker):
    from diffalign.rewards import load_reward

    path = _plant(tmp_path / "weights" / filename, marker)
    for weights in (path, path.parent):  # the file, or a folder holding it
        with pytest.raises(PickledWeightsError, match=r"--allow-pickle \(allow_pickle=True\)") as err:
            load_reward(reward, weights=str(weights), **kw)
        assert str(path) in str(err.value)
    assert not marker.exists()


def test_a_reward_folder_with_pickled_hf_weights_is_refused_and_cannot_opt_itself_in(tmp_path, marker):
    from diffalign.rewards import load_reward
    from diffalign.shapes.model import reward_model_path

    folder = tmp_path / "reward"
    shutil.copytree(reward_model_path(), folder)
    (folder / "model.safetensors").unlink()
    _plant(folder / "pytorch_model.bin", marker)
    with pytest.raises(PickledWeightsError, match="--allow-pickle"):
        load_reward("shapes-clip", weights=str(folder))
    (folder / "reward.yaml").write_text("reward: shapes-clip\nallow_pickle: true\n")
    with pytest.raises(ValueError, match="sets allow_pickle, which only the caller may"):
        load_reward(str(folder))
    assert not marker.exists()


def test_diffalign_score_refuses_a_pickled_reward_checkpoint_in_one_line_naming_the_flag(tmp_path, marker, capsys):
    from PIL import Image

    from diffalign.cli import main

    path = _plant(tmp_path / "w" / "HPS_v2.1_compressed.pt", marker)
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8)).save(images / "a.png")
    (tmp_path / "prompts.txt").write_text("a photo\n")
    args = ["score", "--reward", "hpsv2.1", "--reward-weights", f"hpsv2.1={path}", "--images", str(images),
            "--prompts", str(tmp_path / "prompts.txt")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "--allow-pickle" in err and "Traceback" not in err and not marker.exists()


def test_allow_pickle_still_reads_only_tensors(tmp_path, marker):
    """With the opt-in a plain state dict loads, but a payload is still refused by torch.load(weights_only=True)."""
    from diffalign.rewards.loading import load_state_dict_file

    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.ones(2)}, plain)
    assert torch.equal(load_state_dict_file(plain, allow_pickle=True)["w"], torch.ones(2))
    with pytest.raises(PickledWeightsError, match="--allow-pickle"):
        load_state_dict_file(plain)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict_file(_plant(tmp_path / "payload.pt", marker), allow_pickle=True)
    assert not marker.exists()
