"""``diffalign eval --rewriter``: benchmark prompts rewritten before generation, scored as the originals.

The benchmark folder is generated with a pipeline wrapper that swaps each prompt for its rewrite
(:class:`RewritingPipeline`), so everything else is the evaluation's own: the GenEval layout with
the *original* prompts and metadata, the same seeds, rewards and the GenEval protocol scored
against the original prompts. ``rewrites.jsonl`` in the folder records every rewrite.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffalign.text.guidance import GUIDANCE_MODES
from diffalign.text.rewriter import PromptRewriter, RewriteConfig


@dataclass
class _Output:
    images: list


class RewritingPipeline:
    """Calls ``pipe`` with ``rewrites[prompt]`` instead of each prompt (unknown prompts pass through);
    with ``guidance="original-centered"`` samples with Parrot-style guidance instead
    (:func:`diffalign.text.guidance.sample_original_centered`). Other attributes are the pipeline's."""

    def __init__(self, pipe, rewrites: dict[str, str], *, guidance: str = "rewrite", original_weight: float = 0.5):
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"unknown guidance {guidance!r}; choose from {GUIDANCE_MODES}")
        self.pipe, self.rewrites, self.guidance, self.original_weight = pipe, rewrites, guidance, original_weight
        self._backbone = None

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompt, *, generator=None, num_inference_steps: int = 50, guidance_scale: float = 7.5,
                 height: int | None = None, width: int | None = None, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        rewritten = [self.rewrites.get(p, p) for p in prompts]
        if self.guidance == "rewrite":
            return self.pipe(rewritten, generator=generator, num_inference_steps=num_inference_steps,
                             guidance_scale=guidance_scale, height=height, width=width, **kwargs)
        from diffalign.rewards.base import to_pil
        from diffalign.text.guidance import (
            backbone_for_pipeline,
            sample_original_centered,
        )

        if kwargs.get("negative_prompt"):
            raise ValueError("original-centred guidance uses the pipeline's default negative; drop negative_prompt")
        if self._backbone is None:
            self._backbone = backbone_for_pipeline(self.pipe)
        gens = generator if isinstance(generator, list) else [generator] * len(prompts)
        images = sample_original_centered(self._backbone, prompts, rewritten, generators=gens,
                                          num_inference_steps=num_inference_steps,
                                          w_original=self.original_weight * guidance_scale,
                                          w_rewrite=(1 - self.original_weight) * guidance_scale,
                                          height=height, width=width, batch_size=len(prompts))
        return _Output(to_pil(images))


def rewrite_prompts(rewriter: str | PromptRewriter, prompts: Sequence[str], *, device: str = "cpu",
                    config: RewriteConfig | None = None) -> dict[str, str]:
    """``{prompt: rewrite}`` (greedy unless ``config`` samples) for the distinct ``prompts``."""
    if isinstance(rewriter, str):
        rewriter = PromptRewriter.from_pretrained(rewriter, device=device)
    distinct = list(dict.fromkeys(prompts))
    out = rewriter.rewrite(distinct, config=config)
    return {p: r[0] for p, r in zip(distinct, out)}


def generate_rewritten(cfg, rewriter: str, *, guidance: str = "rewrite", original_weight: float = 0.5,
                       max_new_tokens: int = 77) -> Path:
    """Generate ``cfg.model``'s images of the eval's prompts, rewritten by ``rewriter``, into
    ``OUT/model-rewritten`` (GenEval layout, resumable); returns the folder."""
    from diffalign.eval.generate import (
        generate_folder,
        load_eval_pipeline,
        resolve_device,
    )
    from diffalign.eval.runner import load_prompts, select_prompts

    g, spec = cfg.generation, cfg.model
    items = load_prompts(cfg)
    indices = select_prompts(items, cfg.prompts.limit)
    folder = Path(cfg.output.dir) / "model-rewritten"
    rewrites = rewrite_prompts(rewriter, [items[i].text for i in indices], device=resolve_device(g.device),
                               config=RewriteConfig(max_new_tokens=max_new_tokens))
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "rewrites.jsonl", "w", encoding="utf-8") as f:
        for i in indices:
            f.write(json.dumps({"index": i, "prompt": items[i].text, "rewrite": rewrites[items[i].text]}) + "\n")
    pipe = load_eval_pipeline(spec.pretrained, lora=spec.lora, finetuned=spec.finetuned, family=spec.family,
                              scheduler=spec.scheduler, dtype=spec.dtype, variant=spec.variant,
                              revision=spec.revision, device=g.device, allow_pickle=spec.allow_pickle)
    info = {"model": spec.pretrained, "lora": spec.lora, "finetuned": spec.finetuned, "rewriter": rewriter,
            "rewriter_guidance": guidance, "original_weight": original_weight, "prompt_set": cfg.prompts.name,
            "limit": cfg.prompts.limit}
    generate_folder(RewritingPipeline(pipe, rewrites, guidance=guidance, original_weight=original_weight), items,
                    folder, indices=indices, images_per_prompt=g.images_per_prompt, seed=g.seed,
                    num_inference_steps=g.num_inference_steps, guidance_scale=g.guidance_scale, height=g.height,
                    width=g.width, batch_size=g.batch_size, negative_prompt=g.negative_prompt, info=info,
                    progress="generate (rewritten prompts)")
    return folder


def with_rewriter(cfg, rewriter: str, *, guidance: str = "rewrite", original_weight: float = 0.5):
    """The eval config that compares ``cfg.model`` on rewritten prompts (generated now, by
    :func:`generate_rewritten`) against ``cfg.compare``, or against the same model on the original
    prompts when no ``compare`` is set."""
    import dataclasses

    folder = generate_rewritten(cfg, rewriter, guidance=guidance, original_weight=original_weight)
    base = cfg.model
    compare = cfg.compare if cfg.compare.is_set else dataclasses.replace(base, name=f"{base.label()} (original prompts)")
    model = dataclasses.replace(base, images=str(folder), name=f"{base.label()} + rewriter {Path(rewriter).name}")
    return dataclasses.replace(cfg, model=model, compare=compare)
