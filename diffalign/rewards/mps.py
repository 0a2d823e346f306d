"""MPS, the Multi-dimensional Preference Score (Kwai-Kolors/MPS, CVPR 2024), overall condition.

Rebuilt from the published code (``trainer/models/clip_model.py`` and ``cross_modeling.py``) on a
transformers ``CLIPModel`` (laion CLIP-ViT-H-14) plus the condition-gated cross-attention module
``Cross_model(dim=1024, layer_num=4, heads=16)`` (dim_head 64, ff_mult 4). Score of image ``x``
for prompt ``p``::

    T = text_projection(text_model(ids(p)).last_hidden_state)            # [B, L, D], all L=77 tokens
    t = T[:, first EOS]                                                   # [B, D] (the pooled EOS token)
    C = text_projection(text_model(ids(condition)).last_hidden_state)   # [L, D]
    r = max_j (T · C_j) / max_i max_j (T_i · C_j)                         # [B, L] per-token relevance
    mask = 0 where r > threshold else −inf                                # over the text tokens
    I = visual_projection(vision_model(x).last_hidden_state)              # [B, 257, D], before post_layernorm
    v = cross_model(I, T, mask)[:, 0]                                     # the CLS query
    score = logit_scale.exp() · cos(t, v)                                 # typically ≈ 9–13

Cross_model layer ``k`` (``layers.k.0`` and ``layers.k.1`` in the checkpoint), each a residual:

- ``CrossAttention``: bias-free LayerNorm on the queries, ``heads`` query heads against one shared
  key/value head of width ``dim_head`` (multi-query), the mask added to the logits, plus a
  parallel SwiGLU feed-forward on the normalised queries;
- ``ParallelTransformerBlock``: bias-free LayerNorm, one fused projection into multi-query
  self-attention with rotary position embeddings (base 10000, on ``dim_head``) and a SwiGLU
  feed-forward, summed.

Choices where the sources differ, or that this code makes (each also on the card):

- **Threshold 0.3**, as in both published evaluation scripts (``eval_overall_mps_on_*.py``) that
  produced the reported accuracies; ``CLIPModel.forward`` (training) uses 0.01. ``threshold=``
  changes it.
- **The relevance is normalised per sample.** The original divides by the maximum over the whole
  batch tensor; its evaluation scripts score one image at a time, so per-sample normalisation
  reproduces them and makes a score independent of what else is in the batch.
- **Condition**: the official "overall" string, with its final period (DiffSynth-Studio's copy
  drops it); any other text can be passed as ``condition=``.
- **Text**: ``input_ids`` only (no attention mask, as the original), padded to
  ``model_max_length`` (77) and truncated; the pooled token is the first EOS, which is what the
  original's ``argmax(input_ids)`` picks for the CLIP tokenizer.
- **Precision**: the original casts pixels to fp16 and ran an fp16 model; this runs in ``dtype``
  (fp32 by default).
- **Images**: the laion CLIP-H ``CLIPImageProcessor`` (shortest side 224 bicubic, HF center crop,
  OpenAI mean/std), as PickScore.

Weights: the original ``MPS_overall_checkpoint.pth`` is a pickled *model object* and is never
unpickled here. A state dict with the original key layout (``model.<CLIPModel keys>``,
``cross_model.layers.*``) loads strictly from ``.safetensors``: DiffSynth-Studio's
``MPS_overall_checkpoint_diffsynth.safetensors`` has that layout, imscore's ``RE-N-Y/mpsv1``
``model.safetensors`` the same under a ``mps.`` prefix (stripped). A pickled plain state dict
(``.pth``/``.pt``/``.bin``) is read only with ``allow_pickle=True``, and then only through
``torch.load(weights_only=True)``. The CLIP config, tokenizer and image processor come from
``clip`` (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); its weights are not needed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffalign.rewards.base import Images, Mode, RewardModel
from diffalign.rewards.hf_clip import PICKSCORE_PROCESSOR_ID, _from_pretrained
from diffalign.rewards.loading import (
    MissingWeightsError,
    load_state_dict_file,
    load_strict,
    pickled_reward_error,
    resolve_file,
)
from diffalign.rewards.preprocess import ImageTransform, from_hf_processor

HUB_ID = "RE-N-Y/mpsv1"               # imscore's safetensors conversion (keys under "mps.")
FILENAME = "model.safetensors"
CLIP_ID = PICKSCORE_PROCESSOR_ID      # laion/CLIP-ViT-H-14-laion2B-s32B-b79K: config, tokenizer, processor
CONDITIONS = {
    "overall": "light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, "
               "structure, instance, texture, quantity, attributes, position, number, location, word, things.",
}
THRESHOLD = 0.3
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# buffers that transformers 4.x saved and 5.x does not: absent from either side is fine
_POSITION_IDS = ("model.text_model.embeddings.position_ids", "model.vision_model.embeddings.position_ids")


# ---------------------------------------------------------------------------- the cross-attention module


class BiasFreeLayerNorm(nn.Module):
    """LayerNorm with a learned gain and a zero bias (kept as a buffer, as in the checkpoint)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class Residual(nn.Module):
    """``fn(x, ...) + x``; the wrapped module is ``fn`` (the checkpoint's ``.fn.`` keys)."""

    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.fn(x, *args) + x


class SwiGLU(nn.Module):
    """``x · silu(gate)`` with ``x, gate`` the two halves of the last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class RotaryEmbedding(nn.Module):
    """Rotary angles ``[n, dim]`` for positions ``0..n-1`` (inverse frequencies ``10000^(-2i/dim)``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, n: int) -> torch.Tensor:
        pos = torch.arange(n, device=self.inv_freq.device, dtype=self.inv_freq.dtype)
        freqs = pos[:, None] * self.inv_freq[None, :]
        return torch.cat((freqs, freqs), dim=-1)


def _rotate(t: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Apply rotary angles ``[n, d]`` to ``t [..., n, d]`` (halves rotated as ``(-x2, x1)``)."""
    x1, x2 = t.chunk(2, dim=-1)
    return t * angles.cos() + torch.cat((-x2, x1), dim=-1) * angles.sin()


def _multi_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Attention of ``q [B, H, N, d]`` (already scaled) on one shared head ``k, v [B, M, d]`` ->
    ``[B, N, H·d]``; ``bias [B, N, M]`` is added to the logits of every head."""
    logits = torch.einsum("bhnd,bmd->bhnm", q, k)
    if bias is not None:
        logits = logits + bias[:, None].to(logits.dtype)
    attn = (logits - logits.amax(dim=-1, keepdim=True)).softmax(dim=-1)
    out = torch.einsum("bhnm,bmd->bhnd", attn, v)
    return out.transpose(1, 2).flatten(2)


class CrossAttention(nn.Module):
    """Queries ``x [B, N, dim]`` attend to ``context [B, M, dim]`` (multi-query: ``heads`` query
    heads, one key/value head), with an additive ``mask [B, N, M]``; plus a parallel SwiGLU
    feed-forward of the normalised queries. Returns ``[B, N, dim]`` (before the residual)."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 16, ff_mult: int = 4):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.norm = BiasFreeLayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * ff_mult * dim, bias=False), SwiGLU(),
                                nn.Linear(ff_mult * dim, dim, bias=False))

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        x = self.norm(x)
        q = self.to_q(x).view(b, n, self.heads, self.dim_head).transpose(1, 2) * self.dim_head ** -0.5
        k, v = self.to_kv(context).chunk(2, dim=-1)
        return self.to_out(_multi_query(q, k, v, mask)) + self.ff(x)


class ParallelTransformerBlock(nn.Module):
    """Self-attention (multi-query, rotary) and a SwiGLU feed-forward computed in parallel from one
    fused projection of the normalised input ``[B, N, dim]``; returns their sum (before the residual)."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 16, ff_mult: int = 4):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.split = (heads * dim_head, dim_head, dim_head, 2 * ff_mult * dim)
        self.norm = BiasFreeLayerNorm(dim)
        self.rotary_emb = RotaryEmbedding(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.split), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Sequential(SwiGLU(), nn.Linear(ff_mult * dim, dim, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v, ff = self.fused_attn_ff_proj(self.norm(x)).split(self.split, dim=-1)
        q = q.view(b, n, self.heads, self.dim_head).transpose(1, 2)
        angles = self.rotary_emb(n).to(q.dtype)
        q, k = _rotate(q, angles) * self.dim_head ** -0.5, _rotate(k, angles)
        return self.attn_out(_multi_query(q, k, v, None)) + self.ff_out(ff)


class CrossModel(nn.Module):
    """MPS's ``Cross_model``: ``layers`` pairs of (residual cross-attention to the text, residual
    parallel self-attention block). ``forward(image_tokens [B, N, dim], text_tokens [B, M, dim],
    mask [B, N, M]) -> [B, N, dim]``."""

    def __init__(self, dim: int = 1024, layers: int = 4, dim_head: int = 64, heads: int = 16, ff_mult: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([Residual(CrossAttention(dim, dim_head, heads, ff_mult)),
                           Residual(ParallelTransformerBlock(dim, dim_head, heads, ff_mult))])
            for _ in range(layers))

    def forward(self, queries: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for cross, block in self.layers:
            queries = block(cross(queries, context, mask))
        return queries


# ---------------------------------------------------------------------------- the reward


def original_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original key layout (``model.*``, ``cross_model.*``): imscore's ``mps.`` prefix is stripped."""
    if sd and all(k.startswith("mps.") for k in sd):
        return {k[len("mps."):]: v for k, v in sd.items()}
    return dict(sd)


def read_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The MPS state dict of a ``.safetensors`` file, or (``allow_pickle=True``) of a pickled plain
    state dict read with ``torch.load(weights_only=True)``. A pickled model object is refused."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        if not allow_pickle:
            raise pickled_reward_error(path, "MPS state dict")
        try:
            sd = load_state_dict_file(path, allow_pickle=True)
        except ValueError as e:
            raise ValueError(f"{e}. The original MPS_overall_checkpoint.pth is a pickled model object: convert it "
                             "once, where you trust the file, to a state dict saved with "
                             "safetensors.torch.save_file(model.state_dict(), ...)") from None
    else:
        sd = load_state_dict_file(path)
    return original_layout(sd)


class MPS(RewardModel):
    """MPS (overall): ``logit_scale.exp() · cos(text EOS feature, cross-attended image CLS)``, typically
    ≈ 9–13. The formula, the cross-attention module and every choice are in the module docstring.

    Args:
        model: the transformers ``CLIPModel`` (laion CLIP-ViT-H-14 architecture).
        cross_model: the :class:`CrossModel` (its ``dim`` is the CLIP projection dim).
        tokenizer: the CLIP tokenizer.
        transform: the image preprocessing.
        condition: "overall" or any condition text.
        threshold: relevance threshold of the text-token mask.
    """

    name = "mps"

    def __init__(self, model, cross_model: CrossModel, tokenizer, transform: ImageTransform,
                 condition: str = "overall", threshold: float = THRESHOLD, mode: Mode = "exact",
                 batch_size: int = 32, dtype: torch.dtype = torch.float32):
        super().__init__(mode=mode, batch_size=batch_size)
        self.model = model.to(dtype).eval().requires_grad_(False)
        self.cross_model = cross_model.to(dtype).eval().requires_grad_(False)
        self.tokenizer, self.transform, self.threshold = tokenizer, transform, float(threshold)
        self.condition = CONDITIONS.get(condition, condition)
        positions = model.config.text_config.max_position_embeddings
        self.max_length = min(positions, tokenizer.model_max_length)
        self.eos_token_id = tokenizer.eos_token_id

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None, clip: str | os.PathLike | None = None,
                        filename: str = FILENAME, allow_pickle: bool = False, cross_layers: int = 4,
                        cross_heads: int = 16, cross_dim_head: int = 64, cross_ff_mult: int = 4, **kw) -> MPS:
        """``weights``: the MPS state dict (a file, a folder holding ``filename``, or a hub id; default
        imscore's ``RE-N-Y/mpsv1``). ``clip``: hub id or folder with the CLIP ``config.json``,
        tokenizer and image-processor config (default: the local folder of ``weights`` if it holds
        them, else the laion CLIP-H repository). ``cross_*``: the cross module's shape (defaults: MPS's)."""
        from transformers import (
            AutoTokenizer,
            CLIPConfig,
            CLIPImageProcessor,
            CLIPModel,
        )

        path = resolve_file(weights, filename, HUB_ID if weights is None else None, what="MPS")
        sd = read_checkpoint(path, allow_pickle=allow_pickle)  # first: a refused file fetches nothing
        if clip is None:  # a local folder that also holds the CLIP files, else laion CLIP-H
            local = weights is not None and os.path.exists(str(weights))
            processor_files = ("preprocessor_config.json", "processor_config.json")
            has_clip = (path.parent / "config.json").is_file() and any((path.parent / f).is_file()
                                                                         for f in processor_files)
            clip = path.parent if local and has_clip else CLIP_ID
        try:
            config = _from_pretrained(CLIPConfig, clip, "MPS (CLIP config)", "config.json")
            tokenizer = _from_pretrained(AutoTokenizer, clip, "MPS (CLIP tokenizer)", "tokenizer files")
            processor = _from_pretrained(CLIPImageProcessor, clip, "MPS (CLIP image processor)",
                                         "preprocessor_config.json")
        except MissingWeightsError as e:
            raise MissingWeightsError(f"{e} For MPS these CLIP files (of {CLIP_ID}) are passed as clip='DIR'; "
                                      "weights= is the MPS state dict.") from e
        reward = cls(CLIPModel(config), CrossModel(config.projection_dim, cross_layers, cross_dim_head, cross_heads,
                                                   cross_ff_mult),
                     tokenizer, from_hf_processor(processor), **kw)
        load_strict(reward, sd, f"MPS ({path.name})", ignore=_POSITION_IDS)
        return reward

    # ------------------------------------------------------------------ features
    def _ids(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt")["input_ids"].to(self.device)

    def text_tokens(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(projected tokens [B, L, D], projected first-EOS token [B, D])`` of ``texts``."""
        ids = self._ids(texts)
        tokens = self.model.text_projection(self.model.text_model(input_ids=ids).last_hidden_state)
        is_eos = (ids == self.eos_token_id).int()
        pos = torch.where(is_eos.any(-1), is_eos.argmax(-1), ids.argmax(-1))
        return tokens, tokens[torch.arange(len(ids), device=ids.device), pos]

    def text_mask(self, text_tokens: torch.Tensor) -> torch.Tensor:
        """Additive mask ``[B, L]`` over the text tokens: 0 where the token's relevance to the
        condition (max over condition tokens of the dot product, divided by the sample's maximum)
        exceeds ``threshold``, else −inf."""
        cond, _ = self.text_tokens([self.condition])
        rel = torch.einsum("bld,md->blm", text_tokens, cond[0]).amax(dim=-1)
        rel = rel / rel.amax(dim=-1, keepdim=True)
        zero = torch.zeros((), dtype=text_tokens.dtype, device=text_tokens.device)
        return torch.where(rel > self.threshold, zero, torch.full_like(zero, float("-inf"))).detach()

    def image_tokens(self, images: Images) -> torch.Tensor:
        """Projected vision tokens ``[B, 1 + patches, D]`` (``last_hidden_state``, before post_layernorm)."""
        pixels = self.transform(images, self.mode).to(self.device, next(self.model.parameters()).dtype)
        return self.model.visual_projection(self.model.vision_model(pixel_values=pixels).last_hidden_state)

    def _score(self, images: Images, prompts: list[str]) -> torch.Tensor:
        tokens, eos = self.text_tokens(prompts)
        img = self.image_tokens(images)
        mask = self.text_mask(tokens)[:, None, :].expand(-1, img.shape[1], -1)
        cls = self.cross_model(img, tokens, mask)[:, 0]
        cos = ((eos / eos.norm(dim=-1, keepdim=True)) * (cls / cls.norm(dim=-1, keepdim=True))).sum(-1)
        return self.model.logit_scale.exp() * cos
