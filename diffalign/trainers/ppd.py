"""PPD: personalized preference fine-tuning (Dang et al., CVPR 2025, arXiv 2501.06655) on the shared core.

One model for many users: each pair ``(c, x_w, x_l)`` comes with its user ``u`` (Pick-a-Pic's ``user_id``),
whose preference embedding ``e_u`` ``[E]`` was made once from a few of the user's pairs by a frozen encoder
(:mod:`diffalign.data.users`). The UNet attends to ``e_u`` through a user adapter
(:mod:`diffalign.models.user_adapter`): ``e_u`` → ``T`` tokens ``[T, D]`` by a trained projection, **appended
to the text tokens** (``prompt_embeds`` ``[B, S, D]`` → ``[B, S + T, D]``), and read by a decoupled
(IP-Adapter-style) cross-attention branch in every cross-attention layer, its output added to the text
attention's. The loss is Diffusion-DPO's with the policy conditioned on the user, against the reference
without user conditioning (the LoRA off and zero user tokens, which is exactly the base UNet)::

    L = −log σ(−½β·[(‖ε − ε_θ(x_t^w, c, e_u, t)‖² − ‖ε − ε_ref(x_t^w, c, t)‖²)
                    − (‖ε − ε_θ(x_t^l, c, e_u, t)‖² − ‖ε − ε_ref(x_t^l, c, t)‖²)])

(:func:`~diffalign.trainers.method.diffusion_dpo_loss`, the same function as Diffusion-DPO's.) At step 0 the
LoRA's B and the adapter's value projections are zero, so the policy is the reference and ``L = ln 2``.

``final/`` holds the LoRA (``pytorch_lora_weights.safetensors``) and ``user_adapter.safetensors``; generate
for a user with a plain diffusers pipeline after :func:`~diffalign.models.user_adapter.load_user_adapter`,
passing ``prompt_embeds`` with the user's tokens appended (and zero tokens on the negative side).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from diffalign.models.base import Conditioning
from diffalign.models.user_adapter import (
    has_user_adapter,
    install_user_adapter,
    save_user_adapter,
    user_tokens,
    with_user_tokens,
)
from diffalign.objectives import loss_terms
from diffalign.trainers.method import (
    Method,
    StepOutput,
    TrainBatch,
    diffusion_dpo_loss,
    register_method,
)


@dataclass
class PPDConfig:
    """PPD.

    Attributes:
        user_embeddings: the safetensors file of ``diffalign data user-embeddings`` for this data (required):
            every pair's ``user_id`` must have a row.
        num_user_tokens: ``T``, the tokens one user embedding becomes (4, IP-Adapter's count; the paper's
            is unverified).
        adapter_scale: ``s``, the weight of the user attention added to the text attention (1.0).
        beta: Diffusion-DPO's β on the ELBO surrogate (5000, as Diffusion-DPO for ε-prediction SD; the paper's
            value is unverified).
        loss_type, loss_weights, label_smoothing: as Diffusion-DPO's (``sigmoid`` DPO by default).
    """

    user_embeddings: str = ""
    num_user_tokens: int = 4
    adapter_scale: float = 1.0
    beta: float = 5000.0
    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0

    def terms(self) -> list[tuple[str, float]]:
        return loss_terms(self.loss_type, self.loss_weights)


def _with_tokens(cond: Conditioning, tokens: torch.Tensor) -> Conditioning:
    """``cond`` with ``tokens`` ``[N, T, D]`` appended to its text tokens (and its mask, if any)."""
    mask = cond.mask
    if mask is not None:
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], tokens.shape[1])], dim=1)
    return dataclasses.replace(cond, prompt_embeds=with_user_tokens(cond.prompt_embeds, tokens), mask=mask)


@register_method("ppd", PPDConfig, kind="offline")
class PPD(Method):
    """Diffusion-DPO conditioned on the pair's user (module docstring)."""

    def __init__(self, config: PPDConfig, backbone):
        from diffalign.data.users import load_user_embeddings

        super().__init__(config, backbone)
        if not config.user_embeddings:
            raise ValueError("method.user_embeddings is required: the file `diffalign data user-embeddings` "
                             "writes for this data")
        if getattr(backbone, "denoiser_name", "unet") != "unet":
            raise ValueError("PPD's user adapter is a UNet cross-attention branch; this backbone's denoiser is a "
                             f"{backbone.denoiser_name}")
        if backbone.is_full_finetune:
            raise ValueError("PPD trains a LoRA and the user adapter: set model.lora_rank > 0 (the full fine-tune's "
                             "saved UNet would carry the adapter's weights where plain diffusers does not expect them)")
        self.users = load_user_embeddings(config.user_embeddings)
        self.unet = backbone.raw_denoiser
        if not has_user_adapter(self.unet):
            install_user_adapter(self.unet, self.users.embeddings.shape[1], num_tokens=config.num_user_tokens,
                                 scale=config.adapter_scale)

    def conditioned(self, batch: TrainBatch) -> tuple[Conditioning, Conditioning]:
        """The policy's conditioning (the pairs' user tokens appended to both rows of each pair) and the
        reference's (zero user tokens: the UNet without user conditioning)."""
        if batch.users is None:
            raise ValueError("PPD needs each pair's user: the data has no user_id column")
        emb = self.users.lookup(batch.users).to(batch.x_t.device)
        tokens = user_tokens(self.unet, emb).repeat(2, 1, 1)  # [2B, T, D]: winners, then losers
        return _with_tokens(batch.cond, tokens), _with_tokens(batch.cond, torch.zeros_like(tokens))

    def loss(self, batch: TrainBatch) -> StepOutput:
        policy_cond, ref_cond = self.conditioned(batch)
        policy = self.errors(dataclasses.replace(batch, cond=policy_cond))
        ref = self.errors(dataclasses.replace(batch, cond=ref_cond), reference=True)
        return diffusion_dpo_loss(policy, ref, batch.weights, self.config)

    def write_final(self, folder) -> None:
        """``final/user_adapter.safetensors`` beside the LoRA (called by the loop's ``save_final``)."""
        save_user_adapter(self.unet, folder)
