"""Training data the Shapes world renders itself, as the trainers read it: ``batch(step, micro, process,
num_processes) -> TrainBatch``, a pure function of the run position (:mod:`diffalign.core.positions`)
like the stored-data source :class:`~diffalign.trainers.data.TrainingData`.

* :class:`ShapesPretrainData`: train-split captions, one rendered scene each (ReFL's pre-training term
  on the Shapes base model).
* :class:`RenderedWinners`: a ground-truth render of each of a prompt list's prompts (SePPO's winners
  on the Shapes base model).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from diffalign.core.positions import (
    micro_batch_positions,
    position_generator,
    stable_seed,
)
from diffalign.trainers.method import TrainBatch


def _encoded_batch(backbone, images: list, prompts: list[str], gens: list) -> TrainBatch:
    """VAE latents (posterior mode) of ``images``, noised by the backbone's forward process with one
    generator per example, and the prompts' conditioning."""
    import torch

    from diffalign.rewards.base import to_tensor

    device = backbone.device
    latents = backbone.encode_images(to_tensor(images) * 2 - 1).float().to(device)
    noisy = backbone.forward_process.noise_examples(latents, gens)
    return TrainBatch(latents=latents, noise=noisy.noise, x_t=noisy.x_t, target=noisy.target,
                      timesteps=noisy.timesteps, cond=backbone.encode_prompt(prompts).to(device),
                      weights=torch.ones(len(prompts), device=device))


@dataclass
class ShapesPretrainData:
    """Pre-training batches from the Shapes renderer: train-split captions, one rendered scene each
    (drawn at the world's 64 px, resized to ``image_size`` if that differs), VAE-encoded (posterior
    mode) and noised by the backbone's forward process."""

    backbone: Any
    batch_size: int
    gradient_accumulation_steps: int
    seed: int
    image_size: int

    def batch(self, step: int, micro: int, process: int, num_processes: int) -> TrainBatch:
        """``batch_size`` rendered, encoded and noised examples (latents ``[B, C, h, w]``)."""
        from PIL import Image

        from diffalign.shapes.grammar import sample_prompt, scene_for_prompt
        from diffalign.shapes.scene import render

        prompts, images, gens = [], [], []
        for pos in micro_batch_positions(step, micro, process, num_processes, self.batch_size,
                                         self.gradient_accumulation_steps):
            rng = random.Random(stable_seed(self.seed, "shapes-pretrain", pos))
            prompt = sample_prompt(rng, split="train")
            prompts.append(prompt.text)
            image = render(scene_for_prompt(prompt, rng))                        # the world's own size (64)
            if image.size != (self.image_size, self.image_size):
                image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            images.append(image)
            gens.append(position_generator(self.seed, "shapes-noise", pos))
        return _encoded_batch(self.backbone, images, prompts, gens)


@dataclass
class RenderedWinners:
    """Winning images of the Shapes world: a ground-truth render (at ``resolution``) of a prompt drawn
    from ``prompts`` at each run position, encoded and noised; rows are winners."""

    backbone: Any
    prompts: list[str]
    resolution: int
    batch_size: int
    gradient_accumulation_steps: int
    seed: int

    def batch(self, step: int, micro: int, process: int, num_processes: int) -> TrainBatch:
        from diffalign.shapes.grammar import parse_prompt, scene_for_prompt
        from diffalign.shapes.scene import render

        texts, images, gens = [], [], []
        for pos in micro_batch_positions(step, micro, process, num_processes, self.batch_size,
                                         self.gradient_accumulation_steps):
            rng = random.Random(stable_seed(self.seed, "render", pos))
            text = self.prompts[rng.randrange(len(self.prompts))]
            texts.append(text)
            images.append(render(scene_for_prompt(parse_prompt(text), rng, image_size=self.resolution)))
            gens.append(position_generator(self.seed, "example", pos))
        return _encoded_batch(self.backbone, images, texts, gens)


__all__ = ["RenderedWinners", "ShapesPretrainData"]
