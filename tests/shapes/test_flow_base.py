"""The flow-matching Shapes base: its pretraining script, the bundled model, and the curve tool's clock."""

import json

import pytest
import torch


def test_flow_pretraining_writes_a_pipeline_that_plain_diffusers_samples(tmp_path):
    """A few steps of `diffalign shapes pretrain-flow` give a StableDiffusion3Pipeline folder (no T5) whose
    latents are re-centred as SD3's are: (z - shift_factor) * scaling_factor has mean 0 and std 1 on the pool."""
    from diffusers import StableDiffusion3Pipeline

    from diffalign.shapes.pretrain import encode_pool, render_pool
    from diffalign.shapes.pretrain_flow import FlowPretrainConfig, load_shared_vae, pretrain_flow

    cfg = FlowPretrainConfig(out=str(tmp_path / "base"), num_scenes=64, steps=2, batch_size=4, warmup_steps=1,
                             threads=1)
    out = pretrain_flow(cfg)
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("two red circles", num_inference_steps=2, guidance_scale=2.0, height=64, width=64).images[0]
    assert image.size == (64, 64)
    assert pipe.scheduler.config.shift == 1.0 and pipe.transformer.config.patch_size == 2

    _, images = render_pool(64, cfg.seed)
    means, _ = encode_pool(load_shared_vae(out), images)
    z = (means - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    assert abs(float(z.mean())) < 1e-4 and float(z.std()) == pytest.approx(1.0, abs=1e-4)
    report = json.loads((tmp_path / "base-report.json").read_text())
    assert report["config"]["steps"] == 2 and set(report["times"]) == {"render_s", "encode_s", "denoiser_s"}


def test_training_minutes_add_the_rollout_and_update_seconds(tmp_path):
    from diffalign.shapes.curve import training_minutes

    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "seconds": 6.0, "rollout_seconds": 24.0, "loss": 0.1}, {"event": "resume"},
            {"step": 2, "seconds": 3.0, "rollout_seconds": 27.0}, {"step": 3, "seconds": 60.0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert training_minutes(path) == {1: 0.5, 2: 1.0, 3: 2.0}


def test_the_bundled_flow_base_loads_in_plain_diffusers_and_as_an_sd3_backbone():
    from diffusers import StableDiffusion3Pipeline

    from diffalign.models.loading import load_backbone
    from diffalign.shapes.model import FLOW_DEFAULT_SAMPLING, flow_base_model_path

    pipe = StableDiffusion3Pipeline.from_pretrained(flow_base_model_path(), text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    image = pipe("a photo of a red circle", generator=gen, **{**FLOW_DEFAULT_SAMPLING, "num_inference_steps": 4})
    assert image.images[0].size == (64, 64)
    backbone = load_backbone("bundled:shapes-sd3-base")
    assert backbone.family == "sd3"
    card = (flow_base_model_path() / "README.md").read_text()
    assert "python -m diffalign.shapes.pretrain_flow" in card and "StableDiffusion3Pipeline" in card


def test_the_pretraining_tools_read_every_config_field_as_a_flag():
    from dataclasses import dataclass

    from diffalign.shapes.pretrain import config_from_flags
    from diffalign.shapes.pretrain_flow import FlowPretrainConfig
    from diffalign.shapes.pretrain_reward import RewardConfig

    cfg = config_from_flags(FlowPretrainConfig, "p", "", ["--num-scenes", "5", "--out", "x", "--lr", "0.5"])
    assert (cfg.num_scenes, cfg.out, cfg.lr) == (5, "x", 0.5) and cfg.steps == FlowPretrainConfig().steps
    assert config_from_flags(RewardConfig, "p", "", []) == RewardConfig()

    @dataclass
    class WithABool:
        flag: bool = False

    with pytest.raises(TypeError, match="WithABool.flag: only str, int and float"):
        config_from_flags(WithABool, "p", "", [])


@pytest.mark.parametrize("entry", ["pretrain", "pretrain_flow", "pretrain_reward", "pretrain_pickscore"])
def test_every_pretraining_tool_refuses_to_write_over_an_earlier_run(tmp_path, entry):
    import importlib

    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "model.safetensors").write_bytes(b"an earlier run's weights")
    with pytest.raises(FileExistsError, match="not empty"):
        importlib.import_module(f"diffalign.shapes.{entry}").main(["--out", str(earlier)])
    assert (earlier / "model.safetensors").read_bytes() == b"an earlier run's weights"
