"""Runs of `diffalign train` on a tiny flow backbone (Qwen-Image, Z-Image), shared by their test files."""

import io
import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from run_helpers import PROMPTS, read_metrics

from diffalign.cli import main


def pair_parquet(path: Path, n: int = 4) -> Path:
    """``n`` Pick-a-Pic rows: a bright disc (winner) against stripes, 40×40 JPEGs; captions of different lengths."""
    from diffalign.data.pickapic import write_pickapic_parquet

    rng = random.Random(0)

    def image(good: bool) -> bytes:
        img = Image.new("RGB", (40, 40), (20, 20, 30) if good else (200, 190, 180))
        d = ImageDraw.Draw(img)
        if good:
            r = rng.randint(8, 13)
            d.ellipse([20 - r, 20 - r, 20 + r, 20 + r], fill=(250, 220, 40))
        else:
            for x in range(0, 40, 3):
                d.line([(x, 0), (x, 40)], fill=(rng.randint(0, 255), 0, rng.randint(0, 255)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        return buf.getvalue()

    captions = ["a yellow disc", "a photo of a yellow disc and the red hat", "disc", "the blue square and a disc"]
    rows = [{"caption": captions[i % 4], "jpg_0": image(True), "jpg_1": image(False), "label_0": 1.0} for i in range(n)]
    return write_pickapic_parquet(rows, path)


def train_offline(model_dir, data, out, *extra) -> list[dict]:
    """`diffalign train` of a preference / SFT method (default Diffusion-DPO) on ``data``; the metric rows."""
    args = ["train", "-", f"--model.pretrained={model_dir}", f"--data.source={data}", "--data.resolution=32",
            f"--train.output_dir={out}", "--train.batch_size=2", "--train.learning_rate=1e-2",
            "--train.checkpointing_steps=0", "--model.lora_rank=4", *extra]
    assert main(args) == 0
    return read_metrics(out)


def train_flow_grpo(model_dir, out, *extra) -> list[dict]:
    """One epoch of `diffalign train` Flow-GRPO (4 trajectories of 3 CFG steps at 32×32, brightness reward)."""
    args = ["train", "-", f"--model.pretrained={model_dir}", "--model.lora_rank=4", "--method.name=flow-grpo",
            f"--method.prompts={json.dumps(PROMPTS)}", "--method.num_steps=3", "--method.guidance_scale=3.0",
            "--method.resolution=32", f"--train.output_dir={out}", "--train.learning_rate=1e-2",
            "--train.checkpointing_steps=0", "--method.reward=brightness", "--method.prompts_per_epoch=2",
            "--method.images_per_prompt=2", "--train.batch_size=2", "--method.timestep_fraction=1.0",
            "--train.gradient_accumulation_steps=1", *extra]
    assert main(args) == 0
    return read_metrics(out)


def assert_offline_method_runs_a_step(model_dir, tmp: Path, method: str) -> None:
    """One step of ``method`` (MaPO, KTO, SFT, ...) trains the LoRA and saves ``final/``; KTO starts at 1 − σ(0)."""
    rows = train_offline(model_dir, pair_parquet(tmp / "pairs.parquet"), tmp / method, "--train.max_steps=1",
                         f"--method.name={method}")
    assert len(rows) == 1 and math.isfinite(rows[0]["loss"]) and rows[0]["grad_norm"] > 0
    if method == "kto":  # policy == reference: every sample's loss is 1 − σ(0)
        assert rows[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert (tmp / method / "final" / "pytorch_lora_weights.safetensors").is_file()


def assert_flow_grpo_ratio_is_one_before_the_first_update(model_dir, tmp: Path) -> None:
    """Flow-GRPO's first step is on-policy (ratio exactly 1, KL 0); the second is off-policy by one update."""
    rows = train_flow_grpo(model_dir, tmp / "run", "--train.max_steps=2")
    assert rows[0]["ratio_max_dev"] == 0.0 and rows[0]["ratio_mean"] == 1.0 and rows[0]["kl"] == 0.0
    assert rows[1]["ratio_max_dev"] > 0.0  # the second step of the epoch is off-policy by one update


def assert_final_loads_in_diffusers(model_dir, final: Path, load_kwargs: dict | None = None, **call) -> None:
    """``final/`` loads into the plain diffusers pipeline (``from_pretrained(model_dir, **load_kwargs)``) with
    ``load_lora_weights``, changes its output, and ``unload_lora_weights()`` gives the base output back."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model_dir, **(load_kwargs or {}))
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a yellow disc", num_inference_steps=2, output_type="np", height=32, width=32, **call)
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(final)
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.unload_lora_weights()
    again = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert abs(before - after).max() > 1e-4
    assert abs(before - again).max() < 1e-6


REPO = Path(__file__).resolve().parents[2]


def run_recipe_on_tiny(recipe: str, model_dir, out, *overrides) -> list[dict]:
    """A shipped recipe, as written except the model, the sizes and ``overrides``, for one optimizer step (in
    fp32: accelerate keeps one mixed-precision setting per process, and the other runs of a test session are fp32)."""
    args = ["train", str(REPO / "pipelines" / recipe), f"--model.pretrained={model_dir}", f"--train.output_dir={out}",
            "--train.max_steps=1", "--train.gradient_accumulation_steps=1", "--train.checkpointing_steps=0",
            "--train.mixed_precision=no", *overrides]
    assert main(args) == 0
    return read_metrics(out)
