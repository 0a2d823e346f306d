"""The one interface every backbone family implements.

A :class:`Backbone` wraps a diffusers pipeline's components and gives the core and the trainers
what they need, whatever the family:

* ``encode_prompt(prompts) -> Conditioning``        (text encoders, no grad)
* ``encode_images(pixels) -> latents``              (VAE, scaled/shifted as the pipeline does)
* ``decode_latents(latents) -> images in [0, 1]``     (``grad=True`` for reward backprop)
* ``negative_conditioning(n)``                     (the pipeline's CFG negative: "" or zeros)
* ``predict(x_t, timesteps, cond) -> prediction``   (the denoiser; gradients flow)
* ``reference()``                                   (context: predictions are the reference model's)
* ``add_lora(...)`` / ``enable_full_finetune()``    (what trains: a peft LoRA, or every denoiser weight)
* ``save_trained(dir)`` / ``load_trained(dir)``     (diffusers LoRA format, or a component folder)
* SDXL only: ``time_ids(...)`` / ``with_time_ids(cond, ...)`` (size/crop micro-conditioning)

Implementations live in :mod:`diffalign.models.sd` (SD1.x/2.x), :mod:`~diffalign.models.sdxl`,
:mod:`~diffalign.models.sd3`, :mod:`~diffalign.models.video` (Wan), :mod:`~diffalign.models.qwen_image` and
:mod:`~diffalign.models.z_image` and :mod:`~diffalign.models.flux`, sharing :class:`diffalign.models.backbone.Backbone`;
:func:`diffalign.models.load_backbone` picks one from a hub id or folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch


@dataclass
class Conditioning:
    """Text (and micro-) conditioning for a batch; every tensor is ``[B, ...]``.

    * ``prompt_embeds``: ``[B, S, D]`` token embeddings for cross-attention.
    * ``pooled``: ``[B, P]`` pooled text embedding (SDXL ``text_embeds``, SD3 ``pooled_projections``).
    * ``time_ids``: ``[B, 6]`` SDXL micro-conditioning (original size, crop top-left, target size).
    * ``mask``: ``[B, S]`` 1 for a real text token, 0 for padding, where prompts are of different lengths
      and ``prompt_embeds`` is right-padded (Qwen-Image, Z-Image). :meth:`cat` pads to the longest.
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def _map(self, fn) -> "Conditioning":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Conditioning(**{k: None if v is None else fn(v) for k, v in values.items()})

    def to(self, *args, **kwargs) -> "Conditioning":
        return self._map(lambda t: t.to(*args, **kwargs))

    def repeat(self, n: int) -> "Conditioning":
        """``n`` copies stacked along the batch: ``[c0..cB, c0..cB, ...]``."""
        return self._map(lambda t: t.repeat(n, *([1] * (t.ndim - 1))))

    def __getitem__(self, index) -> "Conditioning":
        return self._map(lambda t: t[index])

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Stack along the batch. Items with a ``mask`` are right-padded (zeros, mask 0) to the longest
        sequence first; an item without one counts as all tokens real."""
        if any(c.mask is not None for c in items):
            items = [c.padded(max(c.prompt_embeds.shape[1] for c in items)) for c in items]
        first = items[0]
        return Conditioning(
            **{
                f.name: None if getattr(first, f.name) is None else torch.cat([getattr(c, f.name) for c in items])
                for f in fields(first)
            }
        )

    def padded(self, length: int) -> "Conditioning":
        """Right-padded to ``length`` text tokens: zero embeddings, mask 0 (a mask of ones is made if absent)."""
        embeds = self.prompt_embeds
        b, s = embeds.shape[:2]
        mask = self.mask if self.mask is not None else torch.ones(b, s, dtype=torch.long, device=embeds.device)
        if length > s:
            embeds = torch.cat([embeds, embeds.new_zeros(b, length - s, *embeds.shape[2:])], dim=1)
            mask = torch.cat([mask, mask.new_zeros(b, length - s)], dim=1)
        return dataclasses.replace(self, prompt_embeds=embeds, mask=mask)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @staticmethod
    def from_dict(d: dict[str, torch.Tensor]) -> "Conditioning":
        return Conditioning(**{f.name: d.get(f.name) for f in fields(Conditioning)})
