"""`diffalign bench RECIPE.yaml`: training throughput and peak memory.

Runs the recipe's method for a few optimizer steps twice over the same examples: first with an
empty latent/text cache (VAE and text encoders run), then cached (they do not). Reports pairs/s
(examples/s for single-sample methods) for each pass and the peak memory (CUDA allocator peak on a
GPU, peak resident set size on a CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time

import torch

ACCEPTS_OVERRIDES = True  # the dispatcher collects --section.key=value into args.overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see pipelines/)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per pass")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each timed pass")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


def bench(recipe, steps: int = 5, warmup: int = 1) -> dict:
    """Time ``steps`` optimizer steps uncached then cached; returns the numbers as a dict."""
    from diffalign.trainers.loop import setup, train_step

    with tempfile.TemporaryDirectory() as tmp:
        recipe.train.output_dir = tmp
        recipe.data.cache_dir = f"{tmp}/cache"
        recipe.train.max_steps = max(recipe.train.max_steps, 2 * (steps + warmup))
        run = setup(recipe)
        per_step = recipe.train.batch_size * recipe.train.gradient_accumulation_steps * run.accelerator.num_processes
        device = run.accelerator.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def timed_pass(first_position_step: int) -> float:
            run.global_step = first_position_step
            for _ in range(warmup):
                train_step(run)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(run)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return steps * per_step / (time.perf_counter() - t0)

        uncached = timed_pass(0)      # every example is new: VAE + text encoders run
        cached = timed_pass(0)        # the same positions again: all latents/embeddings from the cache
        return {
            "method": recipe.method["name"],
            "model": recipe.model.pretrained,
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "resolution": recipe.data.resolution,
            "batch_per_step": per_step,
            "steps": steps,
            "pairs_per_s_uncached": uncached,
            "pairs_per_s_cached": cached,
            "peak_memory_mb": peak_memory_mb(device),
            "mixed_precision": recipe.train.mixed_precision,
        }


def run(args: argparse.Namespace) -> int:
    from diffalign.trainers.config import load_recipe

    recipe = load_recipe(None if args.recipe == "-" else args.recipe, list(args.overrides))
    result = bench(recipe, steps=args.steps, warmup=args.warmup)
    unit = "pairs/s" if recipe.method["name"] in {"diffusion-dpo", "mapo"} else "examples/s"
    print(f"method {result['method']} on {result['model']} ({result['device']}, {result['resolution']}px, "
          f"{result['batch_per_step']} per step)")
    print(f"  uncached (VAE + text encoders run): {result['pairs_per_s_uncached']:.2f} {unit}")
    print(f"  cached   (latents from the cache):  {result['pairs_per_s_cached']:.2f} {unit}")
    print(f"  peak memory: {result['peak_memory_mb']:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
