"""The shared interface on every family: shapes, gradients, LoRA, the reference toggle, saving."""

import pytest
import torch

from diffalign.models import load_backbone


def test_encode_prompt_shapes(backbone, variant):
    cond = backbone.encode_prompt(["a photo of a red cat", ""])
    assert len(cond) == 2 and cond.prompt_embeds.ndim == 3 and not cond.prompt_embeds.requires_grad
    if variant.startswith("sd3"):  # CLIP-L ‖ CLIP-G padded to T5's width, then max_sequence_length T5 tokens
        assert cond.prompt_embeds.shape == (2, 20 + 256, 64) and cond.pooled.shape == (2, 64)
        t5_part = cond.prompt_embeds[:, 20:]
        assert (t5_part.abs().sum() > 0) == (variant == "sd3-t5")   # zeros when T5 is absent, as the pipeline does
    elif variant == "sdxl":  # penultimate states of both encoders concatenated; pooled from encoder 2
        assert cond.prompt_embeds.shape == (2, 20, 64) and cond.pooled.shape == (2, 32)
    else:
        assert cond.prompt_embeds.shape == (2, 20, 32) and cond.pooled is None
    assert cond.time_ids is None
    assert not torch.allclose(cond.prompt_embeds[0], cond.prompt_embeds[1])


def test_encode_prompt_matches_pipeline(backbone):
    """No classifier-free-guidance duplication, and the pipeline's own numbers."""
    pipe = backbone.pipeline
    cond = backbone.encode_prompt(["a cat"])
    if backbone.family == "sd":
        expected = pipe.encode_prompt(["a cat"], "cpu", 1, True, [""])[0]
    elif backbone.family == "sdxl":
        expected = pipe.encode_prompt(["a cat"], device="cpu")[0]
    else:
        expected = pipe.encode_prompt(["a cat"], None, None, device="cpu")[0]
    torch.testing.assert_close(cond.prompt_embeds, expected)


def test_encode_decode_images(backbone):
    pixels = torch.rand(3, 3, 32, 32) * 2 - 1
    latents = backbone.encode_images(pixels, chunk_size=2)
    assert latents.shape == (3, 4, 16, 16)
    torch.testing.assert_close(latents, backbone.encode_images(pixels))    # mode: deterministic, chunk-independent
    a = backbone.encode_images(pixels, sample=True, generator=torch.Generator().manual_seed(0))
    b = backbone.encode_images(pixels, sample=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, latents)
    cfg = backbone.vae.config
    mode = backbone.vae.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(latents, (mode - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor)
    images = backbone.decode_latents(latents)
    assert images.shape == (3, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_predict_shape_and_gradients(backbone, inputs):
    x_t, t, cond = inputs(backbone)
    with torch.no_grad():
        out = backbone.predict(x_t, t, cond)
    assert out.shape == x_t.shape and torch.isfinite(out).all()
    backbone.add_lora(rank=4)
    assert backbone.is_lora
    params = backbone.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    names = [n for n, p in backbone.raw_denoiser.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in names)
    assert not any(p.requires_grad for p in backbone.vae.parameters())
    backbone.predict(x_t, t, cond).square().mean().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_lora_targets_default_to_attention(backbone):
    backbone.add_lora(rank=2)
    targets = set(backbone.raw_denoiser.peft_config["default"].target_modules)
    expected = {"to_k", "to_q", "to_v", "to_out.0"}
    if backbone.family == "sd3":
        expected |= {"add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    assert targets == expected
    with pytest.raises(RuntimeError, match="already"):
        backbone.add_lora()


def test_lora_reference_is_the_base_model(backbone, inputs, perturb_lora):
    x_t, t, cond = inputs(backbone)
    with torch.no_grad():
        base = backbone.predict(x_t, t, cond)
        backbone.add_lora(rank=4, alpha=8)
        torch.testing.assert_close(backbone.predict(x_t, t, cond), base)   # B = 0 at init
        perturb_lora(backbone)
        policy = backbone.predict(x_t, t, cond)
        with backbone.reference():
            ref = backbone.predict(x_t, t, cond)
            with backbone.reference():   # nesting keeps the reference
                pass
            torch.testing.assert_close(backbone.predict(x_t, t, cond), base)
        after = backbone.predict(x_t, t, cond)
    torch.testing.assert_close(ref, base)
    assert not torch.allclose(policy, base, atol=1e-4)
    torch.testing.assert_close(after, policy)


def test_reference_restores_after_error(backbone, inputs, perturb_lora):
    x_t, t, cond = inputs(backbone)
    backbone.add_lora(rank=4)
    perturb_lora(backbone)
    with torch.no_grad():
        policy = backbone.predict(x_t, t, cond)
        with pytest.raises(KeyError):
            with backbone.reference():
                raise KeyError("boom")
        torch.testing.assert_close(backbone.predict(x_t, t, cond), policy)


def test_reference_through_ddp_wrapper(backbone, inputs, perturb_lora):
    """A trainer replaces ``denoiser`` by accelerate's DDP wrapper; the adapters still toggle."""
    import torch.distributed as dist

    x_t, t, cond = inputs(backbone)
    backbone.add_lora(rank=4)
    perturb_lora(backbone)
    with torch.no_grad():
        base_ref = None
        with backbone.reference():
            base_ref = backbone.predict(x_t, t, cond)
        policy = backbone.predict(x_t, t, cond)
    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        raw = backbone.denoiser
        backbone.denoiser = torch.nn.parallel.DistributedDataParallel(raw)
        assert backbone.raw_denoiser is raw
        with torch.no_grad():
            torch.testing.assert_close(backbone.predict(x_t, t, cond), policy)
            with backbone.reference():
                assert backbone.denoiser is raw                   # DDP's reducer is never involved
                torch.testing.assert_close(backbone.predict(x_t, t, cond), base_ref)
            assert isinstance(backbone.denoiser, torch.nn.parallel.DistributedDataParallel)
            torch.testing.assert_close(backbone.predict(x_t, t, cond), policy)
    finally:
        dist.destroy_process_group()


def test_full_finetune_reference_is_a_frozen_copy(backbone, inputs):
    x_t, t, cond = inputs(backbone)
    with torch.no_grad():
        base = backbone.predict(x_t, t, cond)
    backbone.enable_full_finetune()
    params = backbone.trainable_parameters()
    assert len(params) == len(list(backbone.raw_denoiser.parameters()))
    with torch.no_grad():
        for p in params[:4]:
            p.add_(0.5)
        policy = backbone.predict(x_t, t, cond)
        with backbone.reference():
            ref = backbone.predict(x_t, t, cond)
    torch.testing.assert_close(ref, base)
    assert not torch.allclose(policy, base, atol=1e-4)
    assert backbone.denoiser is getattr(backbone.pipeline, backbone.denoiser_name)
    with pytest.raises(RuntimeError, match="do not mix"):
        backbone.add_lora()


def test_gradient_checkpointing(backbone, inputs):
    backbone.add_lora(rank=2)
    backbone.enable_gradient_checkpointing()
    backbone.raw_denoiser.train()
    x_t, t, cond = inputs(backbone)
    backbone.predict(x_t, t, cond).mean().backward()
    assert all(p.grad is not None for p in backbone.trainable_parameters())


@pytest.mark.parametrize("variant", ["sd"])
def test_full_finetune_reference_follows_accelerate_mixed_precision(backbone, inputs):
    """The frozen copy is made before ``accelerator.prepare``; it must compute in the policy's precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    x_t, t, cond = inputs(backbone)
    backbone.enable_full_finetune()
    AcceleratorState._reset_state(True)  # a training run earlier in this process leaves its state behind
    try:
        accelerator = Accelerator(mixed_precision="bf16", cpu=True)
        backbone.denoiser = accelerator.prepare(backbone.denoiser)
        with torch.no_grad():
            policy = backbone.predict(x_t, t, cond)
            with backbone.reference():
                ref = backbone.predict(x_t, t, cond)
        torch.testing.assert_close(ref, policy)     # identical weights, identical precision
    finally:
        AcceleratorState._reset_state(True)


@pytest.mark.parametrize("variant", ["sd3"])
def test_low_precision_reference_copy(backbone, inputs):
    x_t, t, cond = inputs(backbone)
    with torch.no_grad():
        base = backbone.predict(x_t, t, cond)
    backbone.enable_full_finetune(reference_dtype=torch.bfloat16)
    with torch.no_grad(), backbone.reference():
        ref = backbone.predict(x_t, t, cond)
    torch.testing.assert_close(ref.float(), base, rtol=0.05, atol=0.05)
