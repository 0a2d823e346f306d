"""What save_trained writes loads with plain diffusers, and load_trained restores it."""

import pytest
import torch

from diffalign.models import load_backbone

FAMILY_VARIANTS = ["sd", "sdxl", "sd3"]


def _denoiser_call(denoiser, backbone, x_t, t, cond):
    """Call a bare diffusers denoiser the way its pipeline does, independently of Backbone.predict."""
    if backbone.family == "sd3":
        return denoiser(hidden_states=x_t, timestep=t, encoder_hidden_states=cond.prompt_embeds,
                        pooled_projections=cond.pooled).sample
    kwargs = {}
    if backbone.family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": backbone.default_time_ids(x_t)}
    return denoiser(x_t, t, encoder_hidden_states=cond.prompt_embeds, **kwargs).sample


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_lora_loads_with_plain_diffusers(tmp_path, tiny_folder, backbone, inputs, perturb_lora):
    from diffusers import DiffusionPipeline

    x_t, t, cond = inputs(backbone)
    backbone.add_lora(rank=4, alpha=8)   # alpha != rank: the scale must travel with the file
    perturb_lora(backbone)
    out = backbone.save_trained(tmp_path / "final")
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    with torch.no_grad():
        policy = backbone.predict(x_t, t, cond)

        # a T5-less SD3 folder needs text_encoder_3=None, as diffusers asks of any SD3 loaded without T5
        no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if backbone.family == "sd3" else {}
        pipe = DiffusionPipeline.from_pretrained(tiny_folder(backbone.family), **no_t5)
        pipe.set_progress_bar_config(disable=True)
        denoiser = getattr(pipe, backbone.denoiser_name)
        plain = _denoiser_call(denoiser, backbone, x_t, t, cond)
        images_before = pipe("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                             output_type="np").images
        pipe.load_lora_weights(tmp_path / "final")
        loaded = _denoiser_call(denoiser, backbone, x_t, t, cond)
        images_after = pipe("a red cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                            output_type="np").images
    torch.testing.assert_close(loaded, policy, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, loaded, atol=1e-4)
    assert abs(images_after - images_before).max() > 1e-4


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_load_trained_lora_for_eval_and_resume(tmp_path, tiny_folder, backbone, inputs, perturb_lora):
    x_t, t, cond = inputs(backbone)
    backbone.add_lora(rank=4, alpha=2, target_modules=["to_q", "to_v"])
    perturb_lora(backbone)
    backbone.save_trained(tmp_path / "lora")
    with torch.no_grad():
        policy = backbone.predict(x_t, t, cond)

    fresh = load_backbone(tiny_folder(backbone.family))   # eval: rank/alpha/targets come from the file
    fresh.load_trained(tmp_path / "lora")
    assert fresh.is_lora and fresh.trainable_parameters()
    config = fresh.raw_denoiser.peft_config["default"]
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (4, 2, {"to_q", "to_v"})

    resumed = load_backbone(tiny_folder(backbone.family))  # resume: into an adapter attached by the trainer
    resumed.add_lora(rank=4, alpha=2, target_modules=["to_q", "to_v"])
    resumed.load_trained(tmp_path / "lora")
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x_t, t, cond), policy)
        torch.testing.assert_close(resumed.predict(x_t, t, cond), policy)
        with fresh.reference():
            base = fresh.predict(x_t, t, cond)
    assert not torch.allclose(base, policy, atol=1e-4)


@pytest.mark.parametrize("variant", FAMILY_VARIANTS)
def test_full_finetune_saves_a_component_folder(tmp_path, tiny_folder, backbone, inputs):
    import diffusers

    x_t, t, cond = inputs(backbone)
    backbone.enable_full_finetune()
    with torch.no_grad():
        for p in backbone.trainable_parameters()[:6]:
            p.add_(0.3)
        policy = backbone.predict(x_t, t, cond)
    backbone.save_trained(tmp_path / "final")
    assert list((tmp_path / "final" / backbone.denoiser_name).glob("*.safetensors"))
    cls = getattr(diffusers, type(backbone.raw_denoiser).__name__)
    loaded = cls.from_pretrained(tmp_path / "final", subfolder=backbone.denoiser_name)
    with torch.no_grad():
        torch.testing.assert_close(_denoiser_call(loaded, backbone, x_t, t, cond), policy)

    fresh = load_backbone(tiny_folder(backbone.family))
    fresh.load_trained(tmp_path / "final")
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x_t, t, cond), policy)


def test_load_trained_names_a_wrong_folder(tmp_path, tiny_folder):
    backbone = load_backbone(tiny_folder("sd"))
    with pytest.raises(FileNotFoundError, match="empty-run"):
        backbone.load_trained(tmp_path / "empty-run")


@pytest.mark.parametrize("variant", ["sd"])
@pytest.mark.parametrize("lora", [True, False])
def test_save_from_a_gathered_state_dict(tmp_path, tiny_folder, backbone, inputs, perturb_lora, lora):
    """Under FSDP the bare module holds shards; the trainer passes ``accelerator.get_state_dict``."""
    x_t, t, cond = inputs(backbone)
    if lora:
        backbone.add_lora(rank=4)
        perturb_lora(backbone)
    else:
        backbone.enable_full_finetune()
        with torch.no_grad():
            backbone.trainable_parameters()[0].add_(1.0)
    gathered = {k: v.clone() for k, v in backbone.raw_denoiser.state_dict().items()}
    with torch.no_grad():
        policy = backbone.predict(x_t, t, cond)
        for p in backbone.trainable_parameters():   # the live module no longer holds the weights
            p.zero_()
    backbone.save_trained(tmp_path / "out", state_dict=gathered)
    fresh = load_backbone(tiny_folder("sd"))
    fresh.load_trained(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(fresh.predict(x_t, t, cond), policy)


def test_low_precision_weights_with_fp32_lora(tiny_folder, inputs):
    backbone = load_backbone(tiny_folder("sd"), torch_dtype=torch.bfloat16)
    assert backbone.dtype == torch.bfloat16 and backbone.raw_denoiser.dtype == torch.bfloat16
    backbone.add_lora(rank=4)
    assert all(p.dtype == torch.float32 for p in backbone.trainable_parameters())
    x_t, t, cond = inputs(backbone)
    out = backbone.predict(x_t.bfloat16(), t, cond)
    assert out.shape == x_t.shape
    out.float().square().mean().backward()
    assert all(p.grad is not None for p in backbone.trainable_parameters())


@pytest.mark.parametrize("variant", ["sd", "sd3"])
def test_gathered_lora_entries_are_peft_s_own(backbone, perturb_lora):
    """From a gathered full state dict the LoRA entries are picked as ``get_peft_model_state_dict``
    picks them from the live module, and a missing one is an error, not a silently empty file."""
    from peft.utils import get_peft_model_state_dict

    from diffalign.models.backbone import adapter_state_dict

    backbone.add_lora(rank=4)
    perturb_lora(backbone)
    raw = backbone.raw_denoiser
    full = {k: v.clone() for k, v in raw.state_dict().items()}
    want = get_peft_model_state_dict(raw)
    got = adapter_state_dict(raw, full)
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key])
    lora_key = next(k for k in full if "lora_B" in k)
    with pytest.raises(KeyError, match="lacks the LoRA weights"):
        adapter_state_dict(raw, {k: v for k, v in full.items() if k != lora_key})
