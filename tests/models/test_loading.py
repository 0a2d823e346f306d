import json

import pytest

from diffalign.models import FAMILIES, SD3Backbone, SDBackbone, SDXLBackbone, detect_family, load_backbone
from diffalign.models.backbone import ModelNotFoundError

EXPECTED = {"sd": SDBackbone, "sd-v": SDBackbone, "sdxl": SDXLBackbone, "sd3": SD3Backbone, "sd3-t5": SD3Backbone}


def test_family_detected_from_model_index(tiny_folder, variant):
    folder = tiny_folder(variant)
    backbone = load_backbone(folder)
    assert type(backbone) is EXPECTED[variant]
    assert detect_family(folder) == backbone.family == variant.split("-")[0]
    assert type(load_backbone(str(folder), family=backbone.family)) is EXPECTED[variant]


def test_components_and_forward_process(tiny_folder, variant):
    backbone = load_backbone(tiny_folder(variant))
    assert backbone.denoiser is getattr(backbone.pipeline, backbone.denoiser_name)
    assert backbone.vae is backbone.pipeline.vae and backbone.scheduler is backbone.pipeline.scheduler
    expected = {"sd": "epsilon", "sd-v": "v_prediction", "sdxl": "epsilon", "sd3": "flow", "sd3-t5": "flow"}[variant]
    assert backbone.forward_process.prediction_type == expected
    assert backbone.trainable_parameters() == []
    assert (backbone.pipeline.components.get("text_encoder_3") is not None) == (variant == "sd3-t5")


def test_builds_are_deterministic(tmp_path, tiny_folder):
    from diffalign import testing
    from safetensors.torch import load_file

    again = testing.make_tiny_sd(tmp_path / "sd")
    a = load_file(tiny_folder("sd") / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(again / "unet" / "diffusion_pytorch_model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_missing_folder_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model: no such folder"):
        load_backbone(missing)
    with pytest.raises(ModelNotFoundError, match="no-such-model: no such folder"):
        SDBackbone.from_pretrained(missing)


def test_unreachable_hub_id_names_it(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries
    with pytest.raises(ModelNotFoundError, match="diffalign-tests/definitely-not-a-model: not a local folder and "
                                                 "not in the Hugging Face cache"):
        load_backbone("diffalign-tests/definitely-not-a-model")


def test_unknown_pipeline_and_family(tmp_path, tiny_folder):
    folder = tmp_path / "kandinsky"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ValueError, match="KandinskyV22Pipeline"):
        load_backbone(folder)
    with pytest.raises(ValueError, match="unknown backbone family 'kandinsky'"):
        load_backbone(tiny_folder("sd"), family="kandinsky")
    assert set(FAMILIES) == {"sd", "sdxl", "sd3", "wan", "qwen-image", "z-image", "flux"}


def test_task_variant_maps_to_family(tmp_path):
    folder = tmp_path / "img2img"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline"}))
    assert detect_family(folder) == "sdxl"


def test_an_image_conditioned_checkpoint_is_refused_with_a_clear_error(tmp_path, tiny_folder):
    """An inpainting UNet (9 input channels: latents, mask, masked image) saved under a text-to-image
    pipeline class loads in diffusers but cannot be trained on noisy latents alone."""
    import shutil

    from diffusers import UNet2DConditionModel

    folder = tmp_path / "inpaint"
    shutil.copytree(tiny_folder("sd"), folder)
    config = json.loads((folder / "unet" / "config.json").read_text())
    config.update(in_channels=9)
    UNet2DConditionModel.from_config(config).save_pretrained(folder / "unet")
    with pytest.raises(ValueError, match="unet takes 9 input channels but the VAE's latents have 4: an inpainting"):
        load_backbone(folder)
    assert load_backbone(tiny_folder("sd")).denoiser.config.in_channels == 4


def test_a_family_that_does_not_match_the_folder_names_both(tiny_folder):
    folder = tiny_folder("sd")
    with pytest.raises(ValueError, match=r"model.family is 'sdxl' but .*model_index.json is a 'sd' pipeline "
                                         r"\(StableDiffusionPipeline\)"):
        load_backbone(folder, family="sdxl")
    assert type(load_backbone(folder, family="sd")) is SDBackbone  # a matching family loads


class _Payload:
    """Unpickling this object creates the file ``path`` (what a crafted weights file could do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_weights_load_only_with_allow_pickle_and_a_payload_never_runs(tmp_path, tiny_folder, capsys):
    import torch
    from diffusers import StableDiffusionPipeline

    from diffalign.cli import main
    from diffalign.models.backbone import PickledWeightsError

    pickled = tmp_path / "bin"
    StableDiffusionPipeline.from_pretrained(tiny_folder("sd")).save_pretrained(pickled, safe_serialization=False)
    assert (pickled / "unet" / "diffusion_pytorch_model.bin").is_file()
    with pytest.raises(PickledWeightsError, match=r"--allow-pickle"):
        load_backbone(pickled)
    assert isinstance(load_backbone(pickled, allow_pickle=True), SDBackbone)  # the user's explicit opt-in
    # a crafted .bin: the default refuses it before reading it
    marker = tmp_path / "code-ran"
    torch.save({"weight": _Payload(marker)}, pickled / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(PickledWeightsError):
        load_backbone(pickled)
    assert not marker.exists()
    # through `diffalign train`: one line naming the flag, exit 2, the payload never unpickled
    assert main(["train", "-", f"--model.pretrained={pickled}", f"--train.output_dir={tmp_path / 'run'}",
                 "--method.name=mapo", "--data.source=none.parquet"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err and not marker.exists()
