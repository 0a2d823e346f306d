"""Backbones: one adapter over a diffusers pipeline per family (SD1.x/2.x, SDXL, SD3).

The pipeline keeps its components; the adapter says how each family encodes prompts, which
keyword arguments its denoiser takes, how latents are scaled, and how its LoRA is saved.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import ClassVar

import torch
from accelerate.utils import extract_model_from_parallel

from diffalign.core.forward import forward_process_from_scheduler
from diffalign.models.base import Conditioning

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
SD3_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


class Backbone:
    """A text-to-image diffusion model seen through one interface (see :mod:`diffalign.models.base`)."""

    family: ClassVar[str]
    pipeline_class_name: ClassVar[str]
    denoiser_name: ClassVar[str] = "unet"
    lora_targets: ClassVar[list[str]] = UNET_LORA_TARGETS
    optional_components: ClassVar[tuple[str, ...]] = ("safety_checker", "feature_extractor", "image_encoder")

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.denoiser = getattr(pipeline, self.denoiser_name)   # trainers may replace it by a wrapped module
        self.vae = pipeline.vae
        self.scheduler = pipeline.scheduler
        self.forward_process = forward_process_from_scheduler(pipeline.scheduler)
        self._reference_copy: torch.nn.Module | None = None
        self.is_lora = False
        for m in self._frozen_modules():
            m.requires_grad_(False)
        self.denoiser.requires_grad_(False)
        pipeline.set_progress_bar_config(disable=True)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, torch_dtype: torch.dtype | None = None,
                        variant: str | None = None, revision: str | None = None, **kwargs) -> "Backbone":
        """Load from a hub id or a local folder through the diffusers pipeline class, as a user would."""
        import diffusers

        pipeline_cls = getattr(diffusers, cls.pipeline_class_name)
        try:  # components a folder leaves out (e.g. SD3 saved without T5) are passed as None
            index = diffusers.DiffusionPipeline.load_config(str(name_or_path), revision=revision)
            for name in cls.optional_components:
                entry = index.get(name)
                if entry is None or (isinstance(entry, (list, tuple)) and entry[0] is None):
                    kwargs.setdefault(name, None)
        except (OSError, ValueError):
            pass  # from_pretrained below reports the real problem
        try:
            pipe = pipeline_cls.from_pretrained(str(name_or_path), torch_dtype=torch_dtype, variant=variant,
                                                revision=revision, **kwargs)
        except (OSError, ValueError) as e:
            raise OSError(f"could not load {cls.pipeline_class_name} from {str(name_or_path)!r}: {e}") from e
        return cls(pipe)

    def _frozen_modules(self) -> list[torch.nn.Module]:
        names = ["vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
        return [m for n in names if (m := getattr(self.pipeline, n, None)) is not None]

    @property
    def raw_denoiser(self) -> torch.nn.Module:
        """The denoiser without DDP/FSDP/compile wrappers."""
        return extract_model_from_parallel(self.denoiser)

    @property
    def device(self) -> torch.device:
        return next(self.raw_denoiser.parameters()).device

    def to(self, device) -> "Backbone":
        self.pipeline.to(device)
        if self._reference_copy is not None:
            self._reference_copy.to(device)
        return self

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None,
                      chunk_size: int = 8) -> torch.Tensor:
        """Latents ``[B, C, h, w]`` of images ``[B, 3, H, W]`` in [-1, 1], scaled (and shifted) as the pipeline does.

        ``sample=False`` takes the posterior mean (deterministic, what the cache stores)."""
        cfg = self.vae.config
        out = []
        for chunk in pixels.split(chunk_size):
            dist = self.vae.encode(chunk.to(self.vae.device, self.vae.dtype)).latent_dist
            z = dist.sample(generator) if sample else dist.mode()
            shift = cfg.get("shift_factor") or 0.0
            out.append((z - shift) * cfg.scaling_factor)
        return torch.cat(out)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] from latents ``[B, C, h, w]``."""
        cfg = self.vae.config
        z = latents.to(self.vae.dtype) / cfg.scaling_factor + (cfg.get("shift_factor") or 0.0)
        return (self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)

    # ------------------------------------------------------------------ denoiser
    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's raw prediction ``[B, C, h, w]`` at ``x_t``; gradients flow."""
        raise NotImplementedError

    def add_lora(self, rank: int = 8, alpha: float | None = None, target_modules: list[str] | None = None,
                 dropout: float = 0.0, init: str | bool = "gaussian") -> None:
        """Attach a peft LoRA to the denoiser (diffusers' ``add_adapter``); only it will train.

        ``alpha`` defaults to the rank and the targets to the family's attention projections, as in
        diffusers' Diffusion-DPO scripts. LoRA weights are kept in fp32.
        """
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, init_lora_weights=init,
                            target_modules=target_modules or self.lora_targets)
        self.raw_denoiser.add_adapter(config)
        for p in self.raw_denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        self.is_lora = True

    def enable_full_finetune(self) -> None:
        """Train every denoiser weight; a frozen copy made now is the reference."""
        self._reference_copy = copy.deepcopy(self.raw_denoiser).requires_grad_(False).eval()
        self.raw_denoiser.requires_grad_(True)
        self.is_lora = False

    def enable_gradient_checkpointing(self) -> None:
        self.raw_denoiser.enable_gradient_checkpointing()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.raw_denoiser.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self):
        """Inside, ``predict`` gives the reference model: the same network with its LoRA disabled
        (no second copy in memory), or the frozen copy of a full fine-tune."""
        if self._reference_copy is not None:
            policy = self.denoiser
            self.denoiser = self._reference_copy
            try:
                yield self
            finally:
                self.denoiser = policy
        elif self.is_lora:
            raw = self.raw_denoiser
            raw.disable_adapters()
            try:
                yield self
            finally:
                raw.enable_adapters()
        else:
            yield self

    # ------------------------------------------------------------------ saving
    def save_trained(self, out_dir: str | Path) -> None:
        """LoRA: diffusers format (``pipe.load_lora_weights(out_dir)`` loads it). Full fine-tune: the
        denoiser folder (``<Class>.from_pretrained(out_dir, subfolder="unet"|"transformer")``)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        raw = self.raw_denoiser
        if self.is_lora:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = get_peft_model_state_dict(raw)
            if self.denoiser_name == "unet":  # UNet LoRAs are saved in diffusers' naming; SD3's in peft's, as diffusers does
                layers = convert_state_dict_to_diffusers(layers)
            type(self.pipeline).save_lora_weights(out_dir, **{f"{self.denoiser_name}_lora_layers": layers},
                                                  safe_serialization=True)
        else:
            raw.save_pretrained(out_dir / self.denoiser_name, safe_serialization=True)

    def load_trained(self, path: str | Path) -> None:
        """Load what :meth:`save_trained` wrote (LoRA into the attached adapter, or full weights)."""
        path = Path(path)
        if self.is_lora:
            from diffusers.utils import convert_unet_state_dict_to_peft
            from peft import set_peft_model_state_dict
            from safetensors.torch import load_file

            state = load_file(path / "pytorch_lora_weights.safetensors")
            prefix = self.denoiser_name + "."
            state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if self.denoiser_name == "unet":
                state = convert_unet_state_dict_to_peft(state)
            result = set_peft_model_state_dict(self.raw_denoiser, state)
            unexpected = getattr(result, "unexpected_keys", None)
            if unexpected:
                raise RuntimeError(f"{path}: LoRA keys do not match the model: {unexpected[:5]}")
        else:
            loaded = type(self.raw_denoiser).from_pretrained(path, subfolder=self.denoiser_name)
            self.raw_denoiser.load_state_dict(loaded.state_dict())


class SDBackbone(Backbone):
    """SD1.x / SD2.x (epsilon or v_prediction)."""

    family = "sd"
    pipeline_class_name = "StableDiffusionPipeline"

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        embeds, _ = self.pipeline.encode_prompt(list(prompts), self.device, 1, False)
        return Conditioning(embeds)

    def predict(self, x_t, timesteps, cond):
        return self.denoiser(x_t, timesteps, encoder_hidden_states=cond.prompt_embeds.to(x_t.dtype)).sample


class SDXLBackbone(Backbone):
    """SDXL: two text encoders, pooled embedding and size/crop micro-conditioning."""

    family = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(list(prompts), device=self.device,
                                                            num_images_per_prompt=1, do_classifier_free_guidance=False)
        return Conditioning(embeds, pooled)

    @staticmethod
    def time_ids(original_sizes: torch.Tensor, crops_top_left: torch.Tensor, target_size: tuple[int, int]) -> torch.Tensor:
        """``[B, 6]`` = (original h, w, crop top, left, target h, w) from each image's true size and crop."""
        target = torch.tensor(target_size, dtype=torch.float32).expand(len(original_sizes), 2)
        return torch.cat([original_sizes.float(), crops_top_left.float(), target], dim=1)

    def predict(self, x_t, timesteps, cond):
        if cond.time_ids is None:  # no data-derived micro-conditioning: the pipeline's default for this size
            h, w = x_t.shape[-2] * self.pipeline.vae_scale_factor, x_t.shape[-1] * self.pipeline.vae_scale_factor
            cond.time_ids = self.time_ids(torch.tensor([[h, w]] * len(x_t)), torch.zeros(len(x_t), 2), (h, w))
        added = {"text_embeds": cond.pooled.to(x_t.dtype), "time_ids": cond.time_ids.to(x_t.device, x_t.dtype)}
        return self.denoiser(x_t, timesteps, encoder_hidden_states=cond.prompt_embeds.to(x_t.dtype),
                             added_cond_kwargs=added).sample


class SD3Backbone(Backbone):
    """SD3 (MMDiT, flow matching): CLIP-L + CLIP-G (+ optional T5)."""

    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    lora_targets = SD3_LORA_TARGETS
    optional_components = ("text_encoder_3", "tokenizer_3", "feature_extractor", "image_encoder")
    max_sequence_length = 256

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            list(prompts), None, None, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length)
        return Conditioning(embeds, pooled)

    def predict(self, x_t, timesteps, cond):
        return self.denoiser(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=cond.prompt_embeds.to(x_t.dtype),
                             pooled_projections=cond.pooled.to(x_t.dtype), return_dict=False)[0]


FAMILIES: dict[str, type[Backbone]] = {b.family: b for b in (SDBackbone, SDXLBackbone, SD3Backbone)}
_BY_PIPELINE = {b.pipeline_class_name: b for b in FAMILIES.values()}


def detect_family(name_or_path: str | Path, revision: str | None = None) -> str:
    """``sd``, ``sdxl`` or ``sd3`` from the pipeline's ``model_index.json`` (local folder or hub)."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(str(name_or_path), revision=revision)
    except (OSError, ValueError) as e:
        raise OSError(f"{str(name_or_path)!r} is neither a local diffusers folder nor a reachable hub model "
                      f"(no model_index.json): {e}") from e
    cls = config.get("_class_name") or ""
    if cls in _BY_PIPELINE:
        return _BY_PIPELINE[cls].family
    # variants such as StableDiffusionXLImg2ImgPipeline: the longest matching family prefix
    for name in sorted(_BY_PIPELINE, key=len, reverse=True):
        if cls.startswith(name.removesuffix("Pipeline")):
            return _BY_PIPELINE[name].family
    raise ValueError(f"{name_or_path}: unsupported pipeline {cls!r}; supported: {sorted(_BY_PIPELINE)}")


def load_backbone(name_or_path: str | Path, family: str | None = None, **kwargs) -> Backbone:
    """A backbone from a hub id or a local diffusers folder; the family is detected unless given."""
    family = family or detect_family(name_or_path, kwargs.get("revision"))
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    return FAMILIES[family].from_pretrained(name_or_path, **kwargs)
