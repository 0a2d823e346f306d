"""A user adapter for a UNet: decoupled (IP-Adapter-style) cross-attention to user tokens (PPD).

A user embedding ``e_u`` ``[B, E]`` becomes ``T`` tokens by diffusers' ``ImageProjection`` (one linear
layer to ``T·D`` and a LayerNorm; ``D`` the UNet's ``cross_attention_dim``)::

    u = LayerNorm(reshape(W·e_u + b, [B, T, D]))

The tokens are **appended to the text conditioning**: ``prompt_embeds`` ``[B, S, D]`` becomes
``[B, S + T, D]``, so they travel through any code that passes ``encoder_hidden_states`` (the backbone's
``predict``, a plain diffusers pipeline's ``prompt_embeds``). Every cross-attention layer's processor is
diffusers' ``IPAdapterAttnProcessor2_0``, which splits the last ``T`` tokens off and adds a second
attention over them to the text attention, before the output projection::

    h = softmax(Q·K_textᵀ/√d)·V_text + s·softmax(Q·(W_k^u·u)ᵀ/√d)·(W_v^u·u)

``W_k^u`` starts as a copy of the layer's text key projection and ``W_v^u`` at zero, so an adapter that has
not trained leaves the UNet's prediction unchanged; and because neither has a bias, **zero user tokens**
(``u = 0``) give exactly the UNet without the adapter, whatever the adapter learned: that is how the
reference model ("no user") is called.

Saved as ``user_adapter.safetensors`` (the projection and every layer's ``to_k_ip`` / ``to_v_ip``, with the
embedding size, token count and scale as metadata) beside the LoRA.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ADAPTER_FILE = "user_adapter.safetensors"
PROJECTION = "ppd_user_projection"  # the projection's child name on the UNet


def _processor_class():
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    class UserAttnProcessor(IPAdapterAttnProcessor2_0):
        """diffusers' IP-Adapter processor, given the user tokens as the last ``num_tokens`` of
        ``encoder_hidden_states`` (split here, passed on as diffusers' ``(text, [tokens])`` tuple)."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            if encoder_hidden_states is not None and not isinstance(encoder_hidden_states, tuple):
                end = encoder_hidden_states.shape[1] - self.num_tokens[0]
                encoder_hidden_states = (encoder_hidden_states[:, :end], [encoder_hidden_states[:, end:]])
            return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)

    return UserAttnProcessor


def _cross_attentions(unet: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from diffusers.models.attention_processor import Attention

    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross_attention}


def _base(layer: torch.nn.Module) -> torch.nn.Module:
    return getattr(layer, "base_layer", layer)  # under a peft LoRA


def has_user_adapter(unet: torch.nn.Module) -> bool:
    return hasattr(unet, PROJECTION)


def install_user_adapter(unet: torch.nn.Module, embed_dim: int, *, num_tokens: int = 4,
                         scale: float = 1.0) -> None:
    """Give every cross-attention layer of ``unet`` the user branch and the UNet the projection
    ``E → T`` tokens (module docstring); the new weights are fp32 and trainable."""
    from diffusers.models.embeddings import ImageProjection

    if has_user_adapter(unet):
        raise RuntimeError("this UNet already has a user adapter")
    layers = _cross_attentions(unet)
    if not layers:
        raise ValueError(f"{type(unet).__name__} has no cross-attention layers for a user adapter (PPD needs a UNet)")
    cls = _processor_class()
    device = next(unet.parameters()).device
    for attn in layers.values():
        to_k = _base(attn.to_k)
        proc = cls(hidden_size=to_k.out_features, cross_attention_dim=to_k.in_features, num_tokens=(num_tokens,),
                   scale=scale).to(device, torch.float32)
        with torch.no_grad():
            proc.to_k_ip[0].weight.copy_(to_k.weight.float())
            proc.to_v_ip[0].weight.zero_()
        proc.requires_grad_(True)
        attn.set_processor(proc)
    cross_dim = _base(next(iter(layers.values())).to_k).in_features
    projection = ImageProjection(image_embed_dim=embed_dim, cross_attention_dim=cross_dim,
                                 num_image_text_embeds=num_tokens).to(device, torch.float32)
    projection.requires_grad_(True)
    unet.add_module(PROJECTION, projection)
    unet._user_adapter_config = {"embed_dim": embed_dim, "num_tokens": num_tokens, "scale": scale}


def user_tokens(unet: torch.nn.Module, embeddings: torch.Tensor) -> torch.Tensor:
    """The user tokens ``[B, T, D]`` of embeddings ``[B, E]``."""
    projection = getattr(unet, PROJECTION)
    return projection(embeddings.to(next(projection.parameters()).dtype))


def with_user_tokens(prompt_embeds: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``[B, S, D]`` text tokens with ``[B, T, D]`` user tokens appended: ``[B, S + T, D]``."""
    return torch.cat([prompt_embeds, tokens.to(prompt_embeds.dtype)], dim=1)


def adapter_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights: ``projection.*`` and ``<layer>.to_k_ip`` / ``to_v_ip`` per cross-attention layer."""
    out = {f"projection.{k}": v for k, v in getattr(unet, PROJECTION).state_dict().items()}
    for name, attn in _cross_attentions(unet).items():
        for k, v in attn.processor.state_dict().items():
            out[f"{name}.{k}"] = v
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def save_user_adapter(unet: torch.nn.Module, folder: str | Path) -> Path:
    """Write ``folder/user_adapter.safetensors``; returns its path."""
    from safetensors.torch import save_file

    path = Path(folder) / ADAPTER_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(unet), path, metadata={"config": json.dumps(unet._user_adapter_config)})
    return path


def load_user_adapter(unet: torch.nn.Module, folder: str | Path) -> None:
    """Install the adapter saved in ``folder`` on ``unet`` (a plain diffusers UNet, e.g. ``pipe.unet``) and
    load its weights, in the UNet's dtype; every key must match."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no user adapter here")
    with safe_open(str(path), "pt") as f:
        config = json.loads(f.metadata()["config"])
    install_user_adapter(unet, config["embed_dim"], num_tokens=config["num_tokens"], scale=config["scale"])
    state = load_file(path)
    own = adapter_state_dict(unet)
    if set(state) != set(own):
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise ValueError(f"{path}: does not fit this UNet (missing {missing[:3]}, unexpected {extra[:3]})")
    getattr(unet, PROJECTION).load_state_dict({k[len("projection."):]: v for k, v in state.items()
                                               if k.startswith("projection.")})
    dtype = next(unet.parameters()).dtype  # inference in the UNet's precision (fp16 pipelines)
    getattr(unet, PROJECTION).to(dtype)
    for name, attn in _cross_attentions(unet).items():
        attn.processor.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})
        attn.processor.to(dtype)


class UserPipeline:
    """A diffusers SD / SDXL pipeline (with the adapter loaded) that generates for one user: called like the
    pipeline (``prompt``, ``generator``, ``guidance_scale``, ...), it encodes the prompts, appends the user's
    tokens to the text tokens and zero tokens to the negative ones, and passes ``prompt_embeds``.

    ``embedding``: ``[E]``; a mixture of users is a mixture of their embeddings."""

    def __init__(self, pipe, embedding: torch.Tensor):
        if not has_user_adapter(pipe.unet):
            raise ValueError("the pipeline's UNet has no user adapter: load_user_adapter(pipe.unet, folder) first")
        self.pipe, self.embedding = pipe, embedding.reshape(1, -1)

    def __getattr__(self, name):  # progress bars, device, ...: the pipeline's
        return getattr(self.pipe, name)

    def __call__(self, prompt, *, guidance_scale: float = 7.5, negative_prompt=None, **kwargs):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        pipe = self.pipe
        with torch.no_grad():
            enc = pipe.encode_prompt(prompt=prompts, device=pipe.device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=guidance_scale > 1, negative_prompt=negative_prompt)
            text, neg = enc[0], enc[1]
            tokens = user_tokens(pipe.unet, self.embedding.to(pipe.device).expand(len(prompts), -1)).to(text.dtype)
        embeds = {"prompt_embeds": with_user_tokens(text, tokens)}
        if neg is not None:
            embeds["negative_prompt_embeds"] = with_user_tokens(neg, torch.zeros_like(tokens))
        if len(enc) == 4:  # SDXL: the pooled embeddings as they are
            embeds["pooled_prompt_embeds"], embeds["negative_pooled_prompt_embeds"] = enc[2], enc[3]
        return pipe(guidance_scale=guidance_scale, **embeds, **kwargs)
