"""A causal LM as the shared training loop's "backbone": policy, reference, LoRA, saving.

The engine (:mod:`diffalign.trainers.loop`) trains a model's ``module`` (here: the language model, as
an image backbone's is its denoiser), steps ``trainable_parameters()`` and writes ``save_trained(dir)``.

* LoRA (peft): the reference is the same model with the adapters disabled, as TRL does when no
  ``ref_model`` is given. ``save_trained`` writes a peft adapter folder (``adapter_config.json`` +
  ``adapter_model.safetensors``) that ``PeftModel.from_pretrained(base, dir)`` loads, plus the tokenizer.
* Full fine-tune: a frozen copy is the reference; ``save_trained`` writes a ``from_pretrained`` folder.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from diffalign.text.logprobs import SequenceLogProbs, TokenBatch, sequence_logprobs

CARRIED_FILES = ("rewriter.json",)  # copied from the loaded folder into every saved one
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")  # weight files that unpickle when read


def load_tokenizer(name_or_path: str | Path, *, revision: str | None = None, trust_remote_code: bool = False):
    """``AutoTokenizer`` with a pad token (EOS when it has none)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision, trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ValueError(f"{name_or_path}: the tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def pickled_weights_error(source: str | Path, detail: str):
    """The one refusal of pickled weights, naming ``--allow-pickle`` (as the image backbones do)."""
    from diffalign.models.backbone import PickledWeightsError

    return PickledWeightsError(
        f"{source}: {detail.rstrip('.')}. Its weights are not in safetensors (pickled .bin/.pt), and unpickling a "
        "file can run code: convert them (save_pretrained with safe_serialization=True), or pass --allow-pickle "
        "(model.allow_pickle=true) if you trust the files")


def _refuse_pickled_adapter(adapter: str | Path) -> None:
    """A local peft adapter folder with only pickled weights (``adapter_model.bin``): peft would unpickle it."""
    folder = Path(adapter)
    if folder.is_dir() and not (folder / "adapter_model.safetensors").is_file() \
            and any((folder / name).is_file() for name in ("adapter_model.bin", "adapter_model.pt")):
        raise pickled_weights_error(folder, "no adapter_model.safetensors, only adapter_model.bin")


class CausalLM:
    """A ``transformers`` causal LM and its tokenizer.

    Args:
        model: an ``AutoModelForCausalLM`` (or a peft model around one).
        tokenizer: its tokenizer (a pad token is required; :func:`load_tokenizer` sets one).
    """

    def __init__(self, model: torch.nn.Module, tokenizer, source: str | Path | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        self._reference_model: torch.nn.Module | None = None
        self._lora = False

    @property
    def module(self) -> torch.nn.Module:
        """The trained module, as the engine names it (accelerate prepares and wraps it): the LM."""
        return self.model

    @module.setter
    def module(self, value: torch.nn.Module) -> None:
        self.model = value

    # ---- loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, adapter: str | Path | None = None,
                        revision: str | None = None, torch_dtype: torch.dtype | None = None,
                        trust_remote_code: bool = False, allow_pickle: bool = False) -> CausalLM:
        """A hub id or local folder. A folder holding a peft adapter (``adapter_config.json``) loads its
        base model (``base_model_name_or_path``) with the adapter; ``adapter`` adds one explicitly.
        The adapter is loaded for inference (merge it or train a new one on top).

        Weights load from safetensors only: a model or local adapter saved as a pickle
        (``pytorch_model.bin``, ``adapter_model.bin``) is a
        :class:`~diffalign.models.backbone.PickledWeightsError` unless ``allow_pickle`` (``--allow-pickle``),
        since unpickling a file can run code."""
        from transformers import AutoModelForCausalLM

        if adapter is None and is_adapter_folder(name_or_path):
            adapter, name_or_path = name_or_path, _adapter_base(name_or_path)
        if adapter is not None and not allow_pickle:
            _refuse_pickled_adapter(adapter)
        tok_source = adapter if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file() \
            else name_or_path
        tokenizer = load_tokenizer(tok_source, revision=revision, trust_remote_code=trust_remote_code)
        kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
        try:
            model = AutoModelForCausalLM.from_pretrained(str(name_or_path), revision=revision,
                                                         trust_remote_code=trust_remote_code,
                                                         use_safetensors=None if allow_pickle else True, **kwargs)
        except (OSError, ValueError) as e:
            folder = Path(name_or_path)
            pickled = not folder.is_dir() or any(f.suffix in PICKLE_SUFFIXES for f in folder.iterdir())
            if allow_pickle or "safetensors" not in str(e) or not pickled:
                raise
            raise pickled_weights_error(name_or_path, str(e).splitlines()[0]) from None
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        return cls(model, tokenizer, source=adapter if adapter is not None else name_or_path)

    # ---- what trains
    @property
    def raw_model(self) -> torch.nn.Module:
        """The model without a DDP/accelerate wrapper."""
        from accelerate.utils import extract_model_from_parallel

        return extract_model_from_parallel(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.raw_model.parameters()).device

    def to(self, device) -> CausalLM:
        self.model.to(device)
        if self._reference_model is not None:
            self._reference_model.to(device)
        return self

    def add_lora(self, rank: int = 8, alpha: float | None = None, target_modules: list[str] | str | None = None,
                 dropout: float = 0.0) -> None:
        """Wrap the model in a peft LoRA (all linear layers but the output head unless
        ``target_modules`` names some); only the adapters train."""
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                            target_modules=target_modules or "all-linear", task_type="CAUSAL_LM")
        self.model = get_peft_model(self.model, config)
        self._lora = True

    def enable_full_finetune(self) -> None:
        """Every weight trains; a frozen copy is kept as the reference."""
        self._reference_model = copy.deepcopy(self.raw_model).eval().requires_grad_(False)
        self.raw_model.requires_grad_(True)

    def enable_gradient_checkpointing(self) -> None:
        self.raw_model.gradient_checkpointing_enable()
        if self._lora:
            self.raw_model.enable_input_require_grads()

    def disable_dropout(self) -> None:
        """Set every dropout probability to 0 (TRL's ``disable_dropout``: the policy and the
        reference then see the same network)."""
        for m in self.raw_model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.raw_model.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """Context giving the reference model: adapters disabled (LoRA) or the frozen copy."""
        if self._lora:
            with self.raw_model.disable_adapter():
                yield self.model
        elif self._reference_model is not None:
            yield self._reference_model
        else:
            raise RuntimeError("no reference: call add_lora() or enable_full_finetune() first")

    # ---- log-probs
    def logprobs(self, batch: TokenBatch, *, reference: bool = False) -> SequenceLogProbs:
        """Completion log-probs ``[N]`` of the policy (gradients on) or the reference (no grad)."""
        batch = batch.to(self.device)
        if not reference:
            return sequence_logprobs(self.model, batch)
        with torch.no_grad(), self.reference() as ref:
            return sequence_logprobs(ref, batch)

    # ---- saving
    def save_trained(self, out_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
        """The adapter (LoRA: peft format, safetensors) or the whole model, plus the tokenizer.

        ``state_dict``: the model's full state dict when the bare module holds only shards (FSDP,
        ZeRO-3: the loop passes ``accelerator.get_state_dict(model)``); peft keeps the adapter's keys.
        Call on the main process only.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if state_dict is not None and self._lora:
            # peft's save_pretrained picks the adapter's keys by walking the module tree, whose names carry
            # FSDP's nested wrappers; the same two files, from the gathered weights
            from safetensors.torch import save_file

            from diffalign.models.backbone import adapter_state_dict

            weights = adapter_state_dict(self.raw_model, state_dict)
            weights = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
            save_file(weights, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
            config = copy.copy(self.raw_model.peft_config["default"])
            config.inference_mode = True  # as peft saves it
            config.save_pretrained(str(out_dir))
        else:
            extra = {} if state_dict is None else {"state_dict": state_dict}
            self.raw_model.save_pretrained(str(out_dir), safe_serialization=True, **extra)
        self.tokenizer.save_pretrained(str(out_dir))
        for name in CARRIED_FILES:  # files describing how the model is prompted travel with it
            src = Path(self.source) / name if self.source is not None else None
            if src is not None and src.is_file():
                shutil.copy2(src, out_dir / name)
        return out_dir


def _adapter_base(folder: str | Path) -> str:
    import json

    cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{folder}/adapter_config.json names no base_model_name_or_path; pass the base model "
                         f"and adapter={folder}")
    return base
