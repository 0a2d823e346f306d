"""Shared fixtures of the evaluation tests: one torch thread, a tiny random SD pipeline and LoRA, a paired run."""

import json

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random SD1.x-architecture pipeline saved as a diffusers folder (32 px images)."""
    from diffalign import testing

    return testing.make_tiny_sd(tmp_path_factory.mktemp("eval_tiny") / "sd")


@pytest.fixture(scope="session")
def tiny_sd_lora(tiny_sd, tmp_path_factory):
    """A LoRA for :func:`tiny_sd` in diffusers format (non-zero weights, as after training)."""
    from diffalign.models import load_backbone

    backbone = load_backbone(tiny_sd)
    backbone.add_lora(rank=4)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in backbone.raw_denoiser.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return backbone.save_trained(tmp_path_factory.mktemp("eval_lora") / "final")


PROMPTS = [{"prompt": "a photo of a cat", "category": "animals"}, {"prompt": "a red hat", "category": "things"},
           {"prompt": "the yellow dog", "category": "animals"}]


@pytest.fixture(scope="session")
def tiny_run(tiny_sd, tiny_sd_lora, tmp_path_factory):
    """``(out dir, argv)`` of a paired `diffalign eval` of the tiny pipeline against itself with a LoRA
    (3 prompts in 2 categories, 2 images each, 2 steps); the first test to need its files runs it."""
    root = tmp_path_factory.mktemp("eval_cli")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    out = root / "run"
    argv = ["eval", "--model", str(tiny_sd), "--compare-lora", str(tiny_sd_lora), "--prompts", str(prompts),
            "--rewards", "jpeg-compressibility", "--images-per-prompt", "2", "--steps", "2", "--cfg", "3",
            "--batch-size", "4", "--device", "cpu", "--output-dir", str(out), "--scoring.n_boot=300",
            "--scoring.device=cpu"]
    return out, argv
