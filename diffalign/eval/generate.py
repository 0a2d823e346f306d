"""Image generation with fixed per-prompt seeds, for evaluation and preference-data sampling."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm


def generate(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    num_inference_steps: int = 20,
    guidance_scale: float = 5.0,
    batch_size: int = 16,
    progress: str | None = None,
    **pipe_kwargs,
) -> list[Image.Image]:
    """One image per ``(prompt, seed)``; image ``i`` depends only on ``prompts[i]`` and ``seeds[i]``.

    Each image gets its own ``torch.Generator`` seeded with ``seeds[i]``, so the same prompt and seed
    give the same initial noise for a base model and its aligned version (paired comparisons).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    images: list[Image.Image] = []
    bar = tqdm(total=len(prompts), desc=progress, disable=progress is None)
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[chunk]]
        out = pipe(list(prompts[chunk]), generator=gens, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, **pipe_kwargs)
        images.extend(out.images)
        bar.update(len(gens))
    bar.close()
    return images
