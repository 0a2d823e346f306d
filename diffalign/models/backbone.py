"""The :class:`Backbone` base: one adapter over a diffusers pipeline.

The pipeline keeps its components. A family subclass (:mod:`~diffalign.models.sd`,
:mod:`~diffalign.models.sdxl`, :mod:`~diffalign.models.sd3`) says how prompts are encoded and which
keyword arguments its denoiser takes; everything else (loading, VAE, LoRA, the reference toggle,
saving in diffusers format) is shared and lives here.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from pathlib import Path
from types import MethodType
from typing import ClassVar

import torch
from accelerate.utils import extract_model_from_parallel

from diffalign.core.forward import forward_process_from_scheduler
from diffalign.errors import UsageError
from diffalign.models.base import Conditioning

UNET_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
"""diffusers' Diffusion-DPO scripts (SD1.5 and SDXL) put LoRA on the attention projections."""
SD3_LORA_TARGETS = UNET_LORA_TARGETS + ["add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
"""SD3's joint attention also projects the text stream (diffusers' SD3 LoRA scripts)."""

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"

WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
"""What FSDP's auto-wrap, activation checkpointing and ``torch.compile`` put into the live module's
parameter names; a gathered full state dict names the weights without them."""


def adapter_state_dict(raw: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                     adapter: str = "default") -> dict[str, torch.Tensor]:
    """The LoRA entries of a gathered full ``state_dict``, keyed as peft's ``get_peft_model_state_dict``
    keys them (the adapter name dropped).

    Picked by the names of ``raw``'s trainable LoRA parameters with the wrapper segments removed:
    peft's own selection walks the module tree, whose names carry the nested FSDP wrappers of an
    auto-wrapped model, and so finds none of the gathered keys."""
    names = set()
    for name, p in raw.named_parameters():
        if p.requires_grad and "lora_" in name:
            for segment in WRAPPER_SEGMENTS:
                name = name.replace(segment, "")
            names.add(name)
    missing = sorted(names - set(state_dict))
    if not names or missing:
        raise KeyError(f"the gathered state dict lacks the LoRA weights {missing[:5] or '(none trainable)'}")
    return {name.replace(f".{adapter}.", "."): state_dict[name] for name in sorted(names)}


class PickledWeightsError(UsageError):
    """A model whose weights are pickled, loaded without ``allow_pickle``."""


class ModelNotFoundError(UsageError, OSError):
    """A model name that is neither a local diffusers folder nor a hub id that can be had (offline: in
    the cache), or a local folder that lacks a component's weights."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHTS_NAMES = {"diffusers": "diffusion_pytorch_model.safetensors", "transformers": "model.safetensors"}


def _looks_like_path(name: str) -> bool:
    """A name a user typed as a path (``./m``, ``/m``, ``~/m``, ``runs/a/b``), not a hub ``owner/name``."""
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name


def model_not_found(name: str | Path, error: Exception | None = None) -> ModelNotFoundError:
    """The plain error for a model that cannot be loaded by name: a missing folder, a hub id not in the
    cache while offline (``HF_HUB_OFFLINE=1``), or a hub id the hub does not have (or cannot be reached)."""
    import huggingface_hub.constants as hub

    name = str(name)
    if Path(name).exists():
        return ModelNotFoundError(f"{name}: not a diffusers model folder (no model_index.json)")
    if _looks_like_path(name):
        return ModelNotFoundError(f"{name}: no such folder")
    if hub.HF_HUB_OFFLINE:
        return ModelNotFoundError(
            f"{name}: not a local folder and not in the Hugging Face cache ({hub.HF_HUB_CACHE}); offline "
            f"(HF_HUB_OFFLINE=1) nothing is downloaded: download it once online (huggingface-cli download {name}), "
            "or give the path of a local copy")
    why = str(error).strip().splitlines()[0] if error is not None and str(error).strip() else "not found"
    return ModelNotFoundError(f"{name}: not a local folder, and the Hugging Face hub gave no model_index.json for "
                              f"it ({why}); check the id (and HF_TOKEN for a gated or private model)")


def check_local_weights(folder: str | Path, index: dict, *, skip: set[str] = frozenset(),
                        allow_pickle: bool = False) -> None:
    """Before diffusers loads a local folder: every component with weights (a subfolder with a
    ``config.json``) holds a ``.safetensors`` file. A component with only pickled weights is a
    :class:`PickledWeightsError` (unless ``allow_pickle``); one with none is a :class:`ModelNotFoundError`
    naming the missing file (diffusers would report a missing ``.bin``, or the safetensors refusal)."""
    folder = Path(folder)
    for name, entry in index.items():
        if name.startswith("_") or name in skip or not (isinstance(entry, (list, tuple)) and entry[0]):
            continue
        sub = folder / name
        if not (sub / "config.json").is_file():
            continue
        files = [f.name for f in sub.iterdir() if f.is_file()]
        if any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
            continue
        pickled = [f for f in files if f.endswith(PICKLE_SUFFIXES) or f.endswith(".bin.index.json")]
        if pickled and allow_pickle:
            continue
        if pickled:
            raise PickledWeightsError(
                f"{sub}: its weights are pickled ({pickled[0]}), and unpickling a file can run code: convert them "
                "(save_pretrained with safe_serialization=True), or pass --allow-pickle (model.allow_pickle=true) "
                "if you trust the files")
        expected = WEIGHTS_NAMES.get(str(entry[0]), "*.safetensors")
        raise ModelNotFoundError(f"{sub}: missing weights: no {expected} (the {name} component's weights file "
                                 "was deleted or never copied)")


class Backbone:
    """A text-to-image diffusion model seen through one interface (see :mod:`diffalign.models.base`).

    Attributes:
        pipeline: the diffusers pipeline holding every component.
        denoiser: the UNet / transformer. A trainer may replace it by its accelerate-prepared
            (DDP/FSDP) wrapper; :attr:`raw_denoiser` always gives the bare module.
        vae, scheduler: the pipeline's.
        forward_process: :func:`~diffalign.core.forward.forward_process_from_scheduler` of the scheduler.
    """

    family: ClassVar[str]
    pipeline_class_name: ClassVar[str]
    denoiser_name: ClassVar[str] = "unet"
    lora_targets: ClassVar[list[str]] = UNET_LORA_TARGETS
    token_packing: ClassVar[int] = 1
    """Latent pixels packed into one input token of the denoiser (4 for the 2×2 packing of Qwen-Image):
    its ``in_channels`` is ``token_packing`` times the latents' channels."""
    timestep_sampling: ClassVar[str | None] = None
    """The training density of σ (``"uniform"``, ``"logit_normal"``) where the family's diffusers script differs
    from :func:`~diffalign.core.forward.forward_process_from_scheduler`'s default (FLUX: uniform)."""

    def __init__(self, pipeline):
        self.pipeline = pipeline
        self.denoiser: torch.nn.Module = getattr(pipeline, self.denoiser_name)
        self.vae = pipeline.vae
        denoiser_in = getattr(self.denoiser.config, "in_channels", None)
        denoiser_in = None if denoiser_in is None else denoiser_in // self.token_packing
        latent = getattr(self.vae.config, "latent_channels", None) or getattr(self.vae.config, "z_dim", None)
        if denoiser_in is not None and latent is not None and denoiser_in != latent:
            raise ValueError(
                f"{type(pipeline).__name__}: its {self.denoiser_name} takes {denoiser_in} input channels but the VAE's "
                f"latents have {latent}: an inpainting, image-to-image/video or otherwise image-conditioned "
                "checkpoint. diffalign trains text-to-image (and text-to-video) denoisers on noisy latents alone.")
        self.scheduler = pipeline.scheduler
        self.forward_process = forward_process_from_scheduler(pipeline.scheduler, self.timestep_sampling)
        self._reference_copy: torch.nn.Module | None = None
        self._in_reference = False
        self.is_lora = False
        for module in self._frozen_modules():
            module.requires_grad_(False).eval()
        self.denoiser.requires_grad_(False)
        pipeline.set_progress_bar_config(disable=True)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, torch_dtype: torch.dtype | None = None,
                        variant: str | None = None, revision: str | None = None, allow_pickle: bool = False,
                        load_text_encoders: bool = True, **kwargs) -> "Backbone":
        """Load from a hub id or a local folder with the family's diffusers pipeline class.

        Weights load from safetensors only: a component saved as a pickle (``.bin``) is refused unless
        ``allow_pickle`` (unpickling a file can run code). Extra ``kwargs`` go to the pipeline's
        ``from_pretrained`` (e.g. ``text_encoder_3=None``). Components the folder leaves out (SD3 saved
        without T5, SD without safety checker) are None. ``load_text_encoders=False`` loads none of the
        text encoders (a run whose prompts are all in the latent cache).
        """
        import diffusers

        pipeline_cls = getattr(diffusers, cls.pipeline_class_name)
        try:
            index = diffusers.DiffusionPipeline.load_config(str(name_or_path), revision=revision)
        except (OSError, ValueError) as e:
            raise model_not_found(name_or_path, e) from e
        for name in inspect.signature(pipeline_cls.__init__).parameters:
            entry = index.get(name, "absent")
            if name not in ("self", "kwargs") and (entry is None or (isinstance(entry, (list, tuple))
                                                                      and entry[0] is None)):
                kwargs.setdefault(name, None)
        if not load_text_encoders:
            for name in inspect.signature(pipeline_cls.__init__).parameters:
                if name.startswith("text_encoder"):
                    kwargs[name] = None
        if "safety_checker" in inspect.signature(pipeline_cls.__init__).parameters:
            kwargs.setdefault("safety_checker", None)
            kwargs.setdefault("requires_safety_checker", False)
        if Path(name_or_path).is_dir():
            check_local_weights(name_or_path, index, skip=set(kwargs), allow_pickle=allow_pickle)  # given or None
        try:
            pipe = pipeline_cls.from_pretrained(str(name_or_path), torch_dtype=torch_dtype, variant=variant,
                                                revision=revision, use_safetensors=None if allow_pickle else True,
                                                **kwargs)
        except (OSError, ValueError) as e:
            if not allow_pickle and ".safetensors" in str(e):
                raise PickledWeightsError(
                    f"{name_or_path}: {e} Its weights are pickled (.bin), and unpickling a file can run code: "
                    "convert them (save_pretrained with safe_serialization=True), or pass --allow-pickle "
                    "(model.allow_pickle=true) if you trust the files") from None
            raise OSError(f"cannot load {cls.pipeline_class_name} from {str(name_or_path)!r}: {e}") from e
        return cls(pipe)

    def use_channels_last(self, denoiser: bool = True) -> None:
        """Put the VAE (and, if ``denoiser``, a convolutional denoiser) in channels-last memory format: the
        same numbers to rounding, faster convolutions (oneDNN on CPUs, tensor cores in fp16/bf16). A
        transformer denoiser (SD3, FLUX) and a video model's 3-D convolutions are left as they are."""
        def image_convolutional(module: torch.nn.Module) -> bool:  # 2-D convolutions only (not a video VAE)
            dims = {p.dim() for p in module.parameters()}
            return 4 in dims and 5 not in dims

        if image_convolutional(self.vae):
            self.vae.to(memory_format=torch.channels_last)
        if denoiser and image_convolutional(self.raw_denoiser):
            self.raw_denoiser.to(memory_format=torch.channels_last)

    def drop_vae_encoder(self) -> None:
        """Free the VAE's encoder (a run whose latents are all cached): encoding an image is then an error
        saying so. Decoding (validation images) still works."""
        class Dropped(torch.nn.Module):
            def forward(self, *args, **kwargs):
                raise RuntimeError("the VAE encoder was dropped: this run's latents all come from the cache "
                                   "(diffalign data encode)")

        self.vae.encoder = Dropped()
        self.encoders_dropped = True

    def _frozen_modules(self) -> list[torch.nn.Module]:
        names = ["vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
        return [m for n in names if (m := getattr(self.pipeline, n, None)) is not None]

    @property
    def module(self) -> torch.nn.Module:
        """The trained module, as the engine names it for any model (accelerate prepares and wraps it):
        the denoiser."""
        return self.denoiser

    @module.setter
    def module(self, value: torch.nn.Module) -> None:
        self.denoiser = value

    @property
    def raw_denoiser(self) -> torch.nn.Module:
        """The denoiser without DDP / FSDP / DeepSpeed / ``torch.compile`` wrappers (unwrapped once per
        wrapper: accelerate's unwrap walks every submodule, and this is read several times a step)."""
        cached = self.__dict__.get("_raw_denoiser")
        if cached is not None and cached[0] is self.denoiser:
            return cached[1]
        raw = extract_model_from_parallel(self.denoiser, keep_torch_compile=False)
        self.__dict__["_raw_denoiser"] = (self.denoiser, raw)
        return raw

    @property
    def latent_channels(self) -> int:
        """Channels ``C`` of the latents ``[B, C, h, w]`` the core samples and trains on."""
        return int(self.raw_denoiser.config.in_channels) // self.token_packing

    @property
    def embeds_guidance(self) -> bool:
        """Whether the guidance weight is an input of the denoiser (guidance-distilled FLUX.1-dev): then the
        core passes ``guidance_scale`` to :meth:`predict` and runs no classifier-free guidance."""
        return False

    def flow_schedule(self, num_steps: int, height: int | None = None, width: int | None = None) -> dict:
        """Extra ``set_timesteps`` arguments (``sigmas``, ``mu``) with which the pipeline samples a
        ``height × width`` image in ``num_steps`` flow steps; ``{}`` where it passes none (SD3)."""
        return {}

    def combine_guidance(self, uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance of the denoiser's two outputs ``[B, C, h, w]``: ``u + w (c − u)``."""
        return uncond + scale * (cond - uncond)

    @property
    def device(self) -> torch.device:
        return next(self.raw_denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the frozen weights (LoRA weights are fp32 whatever this is)."""
        return self.vae.dtype

    def to(self, device: torch.device | str) -> "Backbone":
        """Move every component (and the full-fine-tune reference copy) to ``device``."""
        self.pipeline.to(device)
        if self._reference_copy is not None:
            self._reference_copy.to(device)
        return self

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Conditioning:
        """Text conditioning for ``B`` prompts (no classifier-free-guidance duplication; "" allowed)."""
        raise NotImplementedError

    @torch.no_grad()
    def negative_conditioning(self, n: int, negative_prompt: str | None = None) -> Conditioning:
        """The classifier-free-guidance negative for ``n`` samples, as the pipeline builds it.

        ``encode_prompt`` of ``negative_prompt`` (``""`` when None), except where the pipeline zeroes an
        absent negative prompt (SDXL's ``force_zeros_for_empty_prompt``): then zeros shaped like it.
        """
        cond = self.encode_prompt([negative_prompt or ""] * n)
        if negative_prompt is None and self.pipeline.config.get("force_zeros_for_empty_prompt", False):
            cond = Conditioning(torch.zeros_like(cond.prompt_embeds),
                                None if cond.pooled is None else torch.zeros_like(cond.pooled))
        return cond

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None,
                      chunk_size: int = 8) -> torch.Tensor:
        """Latents ``[B, C, H/f, W/f]`` of images ``[B, 3, H, W]`` in [-1, 1], as the pipeline scales them:
        ``(z - shift_factor) * scaling_factor``.

        ``sample=False`` takes the posterior mode (deterministic; what caches store); ``sample=True``
        draws ``latent_dist.sample(generator)`` as diffusers' training scripts do. Encoded ``chunk_size``
        images at a time.
        """
        cfg = self.vae.config
        shift = cfg.get("shift_factor") or 0.0
        out = []
        for chunk in pixels.split(chunk_size):
            dist = self.vae.encode(chunk.to(self.vae.device, self.vae.dtype)).latent_dist
            z = dist.sample(generator) if sample else dist.mode()
            out.append((z - shift) * cfg.scaling_factor)
        return torch.cat(out)

    def decode_latents(self, latents: torch.Tensor, *, chunk_size: int = 8, grad: bool = False) -> torch.Tensor:
        """Images ``[B, 3, H, W]`` in [0, 1] (fp32) from latents ``[B, C, h, w]``.

        ``grad=True`` keeps the graph from the latents to the images (reward backprop); by default the
        VAE runs under ``no_grad``.
        """
        cfg = self.vae.config
        shift = cfg.get("shift_factor") or 0.0
        out = []
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            for chunk in latents.split(chunk_size):
                z = chunk.to(self.vae.device, self.vae.dtype) / cfg.scaling_factor + shift
                out.append((self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(out)

    # ------------------------------------------------------------------ denoiser
    def predict(self, x_t: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoiser's raw prediction (ε, v or flow velocity), same shape as ``x_t`` ``[B, C, h, w]``.

        ``timesteps`` is ``[B]`` as the forward process gives them. Gradients flow to trainable weights.
        """
        raise NotImplementedError

    def add_lora(self, rank: int = 8, alpha: float | None = None, target_modules: list[str] | None = None,
                 dropout: float = 0.0, init: str | bool = "gaussian") -> None:
        """Attach a peft LoRA (adapter ``"default"``) to the denoiser; only it trains, in fp32.

        ``alpha`` defaults to ``rank`` and ``target_modules`` to the family's attention projections,
        as in diffusers' Diffusion-DPO scripts. ``init`` is peft's ``init_lora_weights`` (``"gaussian"``
        as those scripts; ``True`` for Kaiming-A / zero-B). Either way B starts at 0, so the policy
        equals the reference at step 0.
        """
        from peft import LoraConfig

        if self.is_lora:
            raise RuntimeError("a LoRA is already attached to this backbone")
        if self._reference_copy is not None:
            raise RuntimeError("full fine-tuning is enabled; LoRA and full fine-tuning do not mix")
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, init_lora_weights=init,
                            target_modules=list(target_modules or self.lora_targets))
        self.raw_denoiser.add_adapter(config)
        self._lora_to_fp32()
        self.is_lora = True

    def _adapter_layers(self, raw: torch.nn.Module) -> list:
        """The peft adapter layers of ``raw`` (found once: diffusers' ``disable_adapters`` walks every module
        at each call, twice a step)."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        cached = self.__dict__.get("_adapter_layer_cache")
        if cached is None or cached[0] is not raw:
            cached = (raw, [m for m in raw.modules() if isinstance(m, BaseTunerLayer)])
            self.__dict__["_adapter_layer_cache"] = cached
        return cached[1]

    def _lora_to_fp32(self) -> None:
        for name, p in self.raw_denoiser.named_parameters():
            if "lora_" in name:
                p.requires_grad_(True)
                p.data = p.data.float()

    def enable_full_finetune(self, reference_dtype: torch.dtype | None = None) -> None:
        """Train every denoiser weight; a frozen copy made now is the reference.

        ``reference_dtype`` stores the copy in a lower precision (e.g. ``torch.bfloat16``, as diffusers'
        DPO script keeps its ``ref_unet`` in the weight dtype) to halve its memory.
        """
        if self.is_lora:
            raise RuntimeError("a LoRA is attached; LoRA and full fine-tuning do not mix")
        ref = copy.deepcopy(self.raw_denoiser).requires_grad_(False).eval()
        self._reference_copy = ref.to(reference_dtype) if reference_dtype is not None else ref
        self.raw_denoiser.requires_grad_(True)

    @property
    def is_full_finetune(self) -> bool:
        return self._reference_copy is not None

    def enable_gradient_checkpointing(self) -> None:
        """diffusers' activation checkpointing in the denoiser's blocks."""
        self.raw_denoiser.enable_gradient_checkpointing()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters an optimizer should see (LoRA weights, or the whole denoiser)."""
        return [p for p in self.raw_denoiser.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator["Backbone"]:
        """Inside, :meth:`predict` is the reference model's; the previous state returns on exit (also on errors).

        * LoRA: the same network with its adapters disabled (no second copy in memory). The adapters are
          switched on the bare module, so calls keep going through an FSDP wrapper (which gathers the
          shards); a DDP wrapper is bypassed, so reference calls never touch its gradient reducer.
        * Full fine-tune: the frozen copy made by :meth:`enable_full_finetune` (moved to the policy's
          device, and given the policy's accelerate mixed-precision forward, if ``prepare`` changed them).
        * Neither: the model itself. Nested uses are no-ops.

        Call it under ``torch.no_grad()`` unless gradients with respect to the inputs are wanted.
        """
        if self._in_reference:
            yield self
            return
        policy = self.denoiser
        raw = self.raw_denoiser
        self._in_reference = True
        try:
            if self._reference_copy is not None:
                if next(self._reference_copy.parameters()).device != self.device:
                    self._reference_copy.to(self.device)
                self._match_policy_precision(raw)
                self.denoiser = self._reference_copy
                ref_dtype = next(self._reference_copy.parameters()).dtype
                autocast = (torch.autocast(self.device.type, dtype=ref_dtype)
                            if ref_dtype != raw.dtype and "_original_forward" not in raw.__dict__
                            else contextlib.nullcontext())
                with autocast:  # a lower-precision copy (reference_dtype) takes the policy's inputs
                    yield self
            elif self.is_lora:
                if isinstance(policy, torch.nn.parallel.DistributedDataParallel):
                    self.denoiser = raw
                layers = self._adapter_layers(raw)
                for layer in layers:
                    layer.enable_adapters(False)
                try:
                    yield self
                finally:
                    for layer in layers:
                        layer.enable_adapters(True)
            else:
                yield self
        finally:
            self.denoiser = policy
            self._in_reference = False

    def _match_policy_precision(self, raw: torch.nn.Module) -> None:
        """Give the frozen copy (made before ``accelerator.prepare``) the mixed-precision forward that
        ``prepare`` put on the policy (autocast, outputs back to fp32), with accelerate's own helpers."""
        ref = self._reference_copy
        if "_original_forward" not in raw.__dict__ or "_original_forward" in ref.__dict__:
            return
        from accelerate.utils import (
            convert_outputs_to_fp32,
            get_mixed_precision_context_manager,
        )

        ref._original_forward = ref.forward
        forward = get_mixed_precision_context_manager(native_amp=True)(type(ref).forward)
        ref.forward = MethodType(convert_outputs_to_fp32(forward), ref)

    # ------------------------------------------------------------------ saving
    def save_trained(self, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """Write what was trained, in the format diffusers loads, and return ``out_dir``.

        * LoRA: ``pytorch_lora_weights.safetensors`` through the pipeline class's ``save_lora_weights``
          (with the adapter's rank/alpha as metadata), so ``pipe.load_lora_weights(out_dir)`` loads it.
        * Full fine-tune: ``out_dir/unet`` (or ``transformer``) via ``save_pretrained``, loaded by
          ``UNet2DConditionModel.from_pretrained(out_dir, subfolder="unet")``.

        ``state_dict``: the denoiser's full state dict when the bare module holds only shards (FSDP:
        pass ``accelerator.get_state_dict(backbone.denoiser)``). Call on the main process only.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        raw = self.raw_denoiser
        if self.is_lora:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = get_peft_model_state_dict(raw) if state_dict is None else adapter_state_dict(raw, state_dict)
            if self.denoiser_name == "unet":  # diffusers' UNet scripts convert; its SD3 scripts keep peft names
                layers = convert_state_dict_to_diffusers(layers)
            layers = {k: v.detach().cpu().contiguous() for k, v in layers.items()}
            metadata = raw.peft_config["default"].to_dict()
            type(self.pipeline).save_lora_weights(
                out_dir, safe_serialization=True,
                **{f"{self.denoiser_name}_lora_layers": layers,
                   f"{self.denoiser_name}_lora_adapter_metadata": metadata})
        else:
            if state_dict is not None:  # a full copy built on the meta device, holding the gathered weights
                with torch.device("meta"):
                    full = type(raw).from_config(raw.config)
                full.load_state_dict(state_dict, assign=True)
                raw = full
            raw.save_pretrained(out_dir / self.denoiser_name, safe_serialization=True)
        return out_dir

    def load_trained(self, path: str | Path) -> None:
        """Load what :meth:`save_trained` wrote: a LoRA folder or a full denoiser folder.

        A LoRA goes into the attached adapter (for resuming); on a backbone without one it is attached
        first, with the rank/alpha/targets saved in the file, and left trainable.
        """
        path = Path(path)
        lora_file, full_dir = path / LORA_WEIGHTS_NAME, path / self.denoiser_name
        if lora_file.is_file():
            self._load_lora(lora_file)
        elif (full_dir / "config.json").is_file():
            if self.is_lora:
                raise ValueError(f"{path}: holds a full {self.denoiser_name}, but this backbone trains a LoRA")
            loaded = type(self.raw_denoiser).from_pretrained(path, subfolder=self.denoiser_name)
            self.raw_denoiser.load_state_dict(loaded.state_dict())
        else:
            raise FileNotFoundError(f"{path}: neither {LORA_WEIGHTS_NAME} nor {self.denoiser_name}/config.json "
                                    "(written by Backbone.save_trained) is there")

    def _load_lora(self, lora_file: Path) -> None:
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if not self.is_lora:
            config = self._saved_lora_config(lora_file)
            self.add_lora(rank=config["r"], alpha=config["lora_alpha"], target_modules=config["target_modules"],
                          dropout=config.get("lora_dropout", 0.0))
        prefix = self.denoiser_name + "."
        state = {k[len(prefix):]: v for k, v in load_file(lora_file).items() if k.startswith(prefix)}
        if self.denoiser_name == "unet":
            state = convert_unet_state_dict_to_peft(state)
        result = set_peft_model_state_dict(self.raw_denoiser, state)
        unexpected = getattr(result, "unexpected_keys", None)
        if not state or unexpected:
            raise ValueError(f"{lora_file}: LoRA keys do not match this {self.denoiser_name}: "
                             f"{(unexpected or list(state))[:5]}")
        self._lora_to_fp32()

    def _saved_lora_config(self, lora_file: Path) -> dict:
        import json

        from safetensors import safe_open

        with safe_open(str(lora_file), "pt") as f:
            raw_meta = (f.metadata() or {}).get("lora_adapter_metadata")
        if raw_meta is None:
            raise ValueError(f"{lora_file}: no LoRA rank/alpha metadata; call add_lora(...) with the trained "
                             "settings before load_trained")
        prefix = self.denoiser_name + "."  # diffusers packs each component's config under its name
        meta = {k[len(prefix):]: v for k, v in json.loads(raw_meta).items() if k.startswith(prefix)}
        if "r" not in meta:
            raise ValueError(f"{lora_file}: no {self.denoiser_name} LoRA settings in its metadata")
        return meta
