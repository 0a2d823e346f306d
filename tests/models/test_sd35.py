"""SD3.5's transformer options through the SD3 family: RMS qk-norm and MMDiT-X dual attention (SD3.5 Medium's
config) on a tiny random pipeline. No family code knows them: the backbone calls the transformer as the pipeline
does, LoRA reaches the second attention, and Diffusion-DPO / Flow-GRPO run with their on-policy checks."""

import math

import pytest
import torch
from family_runs import (
    assert_final_loads_in_diffusers,
    assert_flow_grpo_ratio_is_one_before_the_first_update,
    pair_parquet,
    train_offline,
)

from diffalign.models import SD3Backbone, load_backbone


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffalign import testing

    return testing.make_tiny_sd3(tmp_path_factory.mktemp("sd35") / "model", sd35=True)


def test_loads_as_sd3_with_qk_norm_and_dual_attention(folder):
    backbone = load_backbone(folder)
    assert isinstance(backbone, SD3Backbone) and backbone.family == "sd3"
    config = backbone.raw_denoiser.config
    assert config.qk_norm == "rms_norm" and tuple(config.dual_attention_layers) == (0,)
    block = backbone.raw_denoiser.transformer_blocks[0]
    assert block.attn2 is not None and block.attn.norm_q is not None


def test_lora_reaches_the_dual_attention(folder):
    backbone = load_backbone(folder)
    backbone.add_lora(rank=4)
    names = [n for n, _ in backbone.denoiser.named_parameters() if "lora_A" in n]
    assert any(".attn2.to_q." in n for n in names) and any(".attn.add_q_proj." in n for n in names)


def test_ode_sampling_reproduces_the_pipeline(folder):
    """noise level 0 with CFG 3: the pipeline's latents, step for step, through qk-norm and the second attention."""
    from diffalign.core.sampling import make_sampler, sample_trajectory

    backbone = load_backbone(folder)
    pipe = backbone.pipeline
    pipe.set_progress_bar_config(disable=True)
    sampler = make_sampler(backbone, 3, eta=0.0, resolution=32)
    traj = sample_trajectory(backbone, sampler, backbone.encode_prompt(["a yellow disc"]), guidance_scale=3.0,
                             generator=torch.Generator().manual_seed(0), height=32, width=32)
    ref = pipe("a yellow disc", generator=torch.Generator().manual_seed(0), output_type="latent",
               guidance_scale=3.0, num_inference_steps=3, height=32, width=32).images
    torch.testing.assert_close(traj.final, ref, rtol=0, atol=1e-5)


def test_diffusion_dpo_starts_at_ln2_and_the_lora_loads_in_plain_diffusers(folder, tmp_path):
    rows = train_offline(folder, pair_parquet(tmp_path / "pairs.parquet"), tmp_path / "run", "--train.max_steps=2")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert rows[0]["implicit_acc"] == 0.5 and rows[1]["loss"] != rows[0]["loss"]
    assert_final_loads_in_diffusers(folder, tmp_path / "run" / "final", guidance_scale=3.0,
                                    load_kwargs={"text_encoder_3": None, "tokenizer_3": None})  # SD3 without T5


def test_flow_grpo_ratio_is_exactly_one_before_the_first_update(folder, tmp_path):
    assert_flow_grpo_ratio_is_one_before_the_first_update(folder, tmp_path)
