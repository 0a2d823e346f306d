"""Sampling with a rewritten prompt, optionally anchored on the original one (Parrot).

Parrot (Lee et al., 2024) samples with *original-prompt-centred guidance*: the expanded prompt adds
quality cues while the user's original prompt keeps steering the content. Its exact equation is not
public in code; we implement the two-condition form of classifier-free guidance

    ε̂ = ε_u + w_o·(ε(x_t, c_original) − ε_u) + w_r·(ε(x_t, c_rewrite) − ε_u)

(ε_u: the pipeline's negative/unconditional prediction). ``w_r = 0`` is plain CFG on the original
prompt, ``w_o = 0`` plain CFG on the rewrite, and with ``original == rewrite`` it is CFG with
``w_o + w_r``. The denoiser runs once per step on ``[x; x; x]``; the sampler is the core's DDIM
(η = 0) / flow Euler step (:mod:`diffalign.core.sampling`), which reproduces the pipeline's
images for the same seed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from PIL import Image

from diffalign.models.base import Conditioning

GUIDANCE_MODES = ("rewrite", "original-centered")


def backbone_for_pipeline(pipe):
    """The :class:`~diffalign.models.Backbone` of a loaded diffusers pipeline (SD1.x/2.x, SDXL, SD3)."""
    from diffalign.models import FAMILIES

    for cls in FAMILIES.values():
        if type(pipe).__name__ == cls.pipeline_class_name:
            return cls(pipe)
    raise ValueError(f"original-centred guidance supports {[c.pipeline_class_name for c in FAMILIES.values()]}, "
                     f"not {type(pipe).__name__}")


def original_centered_prediction(backbone, x: torch.Tensor, timesteps: torch.Tensor, cond_original: Conditioning,
                                 cond_rewrite: Conditioning, uncond: Conditioning, *, w_original: float,
                                 w_rewrite: float) -> torch.Tensor:
    """``ε_u + w_o(ε_o − ε_u) + w_r(ε_r − ε_u)`` at ``x`` ``[B, C, h, w]``, ``timesteps`` ``[B]``; fp32."""
    if uncond.time_ids is None and cond_original.time_ids is not None:
        uncond = dataclasses.replace(uncond, time_ids=cond_original.time_ids)
    x_in = x.to(backbone.dtype)
    t = timesteps.to(x.device)
    out = backbone.predict(torch.cat([x_in] * 3), torch.cat([t] * 3),
                           Conditioning.cat([uncond, cond_original, cond_rewrite]))
    u, o, r = out.float().chunk(3)
    return u + w_original * (o - u) + w_rewrite * (r - u)


@torch.no_grad()
def sample_original_centered(backbone, originals: Sequence[str], rewrites: Sequence[str],
                             seeds: Sequence[int] | None = None, *, generators: Sequence[torch.Generator] | None = None,
                             num_inference_steps: int = 20, w_original: float = 2.5, w_rewrite: float = 2.5,
                             height: int | None = None, width: int | None = None,
                             batch_size: int = 16) -> torch.Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1], one per ``(original, rewrite, seed)``; the seed (or the given
    generator) draws the initial noise as the pipeline does (a CPU generator per image)."""
    from diffalign.core.sampling import initial_latents, make_sampler

    if generators is None:
        if seeds is None:
            raise ValueError("give seeds or generators")
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    if not len(originals) == len(rewrites) == len(generators):
        raise ValueError(f"{len(originals)} originals, {len(rewrites)} rewrites and {len(generators)} seeds")
    sampler = make_sampler(backbone, num_inference_steps, eta=0.0)
    images = []
    for start in range(0, len(originals), batch_size):
        sl = slice(start, start + batch_size)
        o, r = backbone.encode_prompt(list(originals[sl])), backbone.encode_prompt(list(rewrites[sl]))
        u = backbone.negative_conditioning(len(o))
        gens = list(generators[sl])
        x = initial_latents(backbone, sampler, len(o), generator=gens, height=height, width=width)
        for i in range(sampler.num_steps):
            t = sampler.timesteps[torch.full((len(o),), i, dtype=torch.long)]
            pred = original_centered_prediction(backbone, x, t, o, r, u, w_original=w_original, w_rewrite=w_rewrite)
            x = sampler.step(pred, i, x).prev_sample
        images.append(backbone.decode_latents(x))
    return torch.cat(images)


def render_rewrites(pipe, originals: Sequence[str], rewrites: Sequence[str], seeds: Sequence[int], *,
                    guidance: str = "rewrite", num_inference_steps: int = 20, guidance_scale: float = 5.0,
                    original_weight: float = 0.5, height: int | None = None, width: int | None = None,
                    batch_size: int = 16) -> list[Image.Image]:
    """Images for rewritten prompts, one per ``(original, rewrite, seed)``.

    ``guidance="rewrite"``: the pipeline on the rewrite (CFG ``guidance_scale``).
    ``guidance="original-centered"``: Parrot-style, ``w_o = original_weight·guidance_scale`` and
    ``w_r = (1 − original_weight)·guidance_scale``.
    """
    from diffalign.eval.generate import generate
    from diffalign.rewards.base import to_pil

    if guidance == "rewrite":
        kw = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
        return generate(pipe, list(rewrites), list(seeds), num_inference_steps=num_inference_steps,
                        guidance_scale=guidance_scale, batch_size=batch_size, **kw)
    if guidance != "original-centered":
        raise ValueError(f"unknown guidance {guidance!r}; choose from {GUIDANCE_MODES}")
    backbone = backbone_for_pipeline(pipe)
    images = sample_original_centered(backbone, originals, rewrites, seeds, num_inference_steps=num_inference_steps,
                                      w_original=original_weight * guidance_scale,
                                      w_rewrite=(1 - original_weight) * guidance_scale, height=height, width=width,
                                      batch_size=batch_size)
    return to_pil(images)
