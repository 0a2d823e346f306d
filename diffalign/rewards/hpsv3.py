"""HPSv3 (MizzenAI/HPSv3, ICCV 2025): Qwen2-VL-7B-Instruct with an uncertainty-aware ranking head.

Architecture as coded in ``hpsv3`` (``Qwen2VLRewardModelBT``, config ``HPSv3_7B.yaml``): a full
``Qwen2VLForConditionalGeneration`` whose tokenizer gained one special token ``<|Reward|>`` (the
embeddings resized to the new vocabulary), and a "ranknet" head in fp32::

    rm_head = Linear(H, 1024) – ReLU – Dropout(0.05) – Linear(1024, 16) – ReLU – Linear(16, 2)

Score of image ``x`` for prompt ``p``::

    text  = INSTRUCTION.format(text_prompt=p) + "\\nPlease provide the overall ratings of this image: <|Reward|>\\n\\nEND\\n"
    ids   = chat_template([user: (image x, text)], add_generation_prompt=True)
    h     = last hidden state of the language model at the <|Reward|> token              # [B, H]
    μ, s  = rm_head(h.float())                                                            # [B], [B]
    score = μ            (σ = exp(s) is the model's uncertainty, unused by the score)

Scale (rewards_benchmarks §A.3, the README's benchmark): SD2 ≈ −0.24 … Kolors ≈ 10.55.

Images: ``min_pixels = max_pixels = 256·28·28`` in the reference, so every image is resized (PIL
bicubic) to about 200k pixels (448×448 for a square image, 256 visual tokens), then the Qwen2-VL
image processor normalises it (OpenAI CLIP mean/std). The differentiable mode does the same with an
antialiased bicubic ``interpolate`` and :func:`~diffalign.rewards.qwen_vl.patchify`.

Weights: ``hf_hub_download("MizzenAI/HPSv3", "HPSv3.safetensors")`` is the full state dict
(transformers-4 key layout: ``model.*``, ``visual.*``, ``lm_head.*``, ``rm_head.*``), loaded strictly.
The config, tokenizer and processor come from ``base`` (default ``Qwen/Qwen2-VL-7B-Instruct``; the
shipped YAML names a private path instead), whose weights are never read: the model is built on the
meta device and every tensor comes from the HPSv3 file. Batches are right-padded as in the reference.
The instruction text was read in copies of ``hpsv3/dataset/data_collator_qwen.py`` (the official file
is not in the index), so it is unverified against the official repository; ``instruction=`` replaces it.
Precision: the reference runs the backbone in bf16 (head fp32); here ``dtype`` (fp32 default).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from diffalign.rewards.base import Images, Mode, RewardModel, to_pil, to_tensor
from diffalign.rewards.hf_clip import _from_pretrained
from diffalign.rewards.loading import MissingWeightsError, load_state_dict_file, load_strict, resolve_file
from diffalign.rewards.qwen_vl import (
    as_dtype,
    image_processor_stats,
    patchify,
    resize_pil,
    resize_tensor,
    to_transformers5_keys,
)

HUB_ID = "MizzenAI/HPSv3"
FILENAME = "HPSv3.safetensors"
BASE_ID = "Qwen/Qwen2-VL-7B-Instruct"
REWARD_TOKEN = "<|Reward|>"
PIXELS = 256 * 28 * 28                 # min_pixels = max_pixels in the reference
HEAD_HIDDEN, HEAD_DROPOUT = 1024, 0.05

INSTRUCTION = "\n".join([
    "",
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst "
    "and 10 being the best. ",
    "",
    "**Visual Quality:**  ",
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:",
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.",
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.",
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).",
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.",
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. ",
    "",
    "**Text Alignment:**  ",
    "Assess how well the image matches the textual prompt across the following sub-dimensions:",
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) "
    "align with the textual description. The subject should match the description in terms of number, appearance, "
    "and behavior.",
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.",
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.",
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
    "acceptable, but critical attributes should be preserved.",
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.",
    "Textual prompt - {text_prompt}",
    "", "", "",
])
RATING_REQUEST = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"


def ranknet_head(hidden_size: int, out_dim: int = 2, hidden: int = HEAD_HIDDEN, dropout: float = HEAD_DROPOUT
                 ) -> nn.Sequential:
    """HPSv3's ``rm_head`` (``rm_head_type="ranknet"``, no kwargs): ``[.., H] -> [.., out_dim]``; the
    indices 0, 3, 5 are the checkpoint's ``rm_head.{0,3,5}.*`` keys."""
    return nn.Sequential(nn.Linear(hidden_size, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 16),
                         nn.ReLU(), nn.Linear(16, out_dim))


def hpsv3_text(prompt: str, instruction: str = INSTRUCTION) -> str:
    """The user text for ``prompt``: the instruction, then the rating request ending in ``<|Reward|>``."""
    return instruction.format(text_prompt=prompt) + RATING_REQUEST


def checkpoint_layout(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published state dict (optionally under ``"model"``, transformers-4 or -5 key layout) in this
    module's layout: ``model.<Qwen2VLForConditionalGeneration keys>`` and ``rm_head.*``."""
    if "model" in sd and isinstance(sd["model"], Mapping):
        sd = sd["model"]
    out = {}
    for k, v in to_transformers5_keys(sd).items():
        out[k if k.startswith("rm_head.") else "model." + k] = v
    return out


class HPSv3(RewardModel):
    """HPSv3: μ of the ranknet head at the ``<|Reward|>`` token (module docstring), ≈ −1 … 11.

    Args:
        model: the ``Qwen2VLForConditionalGeneration`` (vocabulary including ``<|Reward|>``).
        rm_head: the :func:`ranknet_head` (kept in fp32).
        processor: the Qwen2-VL processor whose tokenizer knows ``<|Reward|>``.
        pixels: ``min_pixels = max_pixels`` of the image resize (reference 256·28·28).
        instruction: the instruction template (``{text_prompt}`` is the prompt).
        dtype: of the backbone (fp32 default; "bf16" as the reference, about 16 GB for the 7B model).
    """

    name = "hpsv3"

    def __init__(self, model, rm_head: nn.Module, processor, pixels: int = PIXELS, instruction: str = INSTRUCTION,
                 mode: Mode = "exact", batch_size: int = 8, dtype: torch.dtype | str = torch.float32):
        super().__init__(mode=mode, batch_size=batch_size)
        self.model = model.to(as_dtype(dtype)).eval().requires_grad_(False)
        self.rm_head = rm_head.float().eval().requires_grad_(False)
        self.processor, self.pixels, self.instruction = processor, int(pixels), instruction
        self.processor.tokenizer.padding_side = "right"
        self.reward_token_id = processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        unk = processor.tokenizer.unk_token_id
        if self.reward_token_id is None or (unk is not None and self.reward_token_id == unk):
            raise ValueError(f"HPSv3: the tokenizer has no {REWARD_TOKEN} token (add it before building the reward)")

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None, base: str | os.PathLike | None = None,
                        filename: str = FILENAME, allow_pickle: bool = False, **kw) -> HPSv3:
        """``weights``: the HPSv3 state dict (a file, a folder holding ``filename``, or a hub id; default
        ``MizzenAI/HPSv3``). ``base``: hub id or folder with the Qwen2-VL ``config.json``, tokenizer and
        processor files (default: the folder of a local ``weights`` if it holds them, else
        ``Qwen/Qwen2-VL-7B-Instruct``); its weights are not read."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

        path = resolve_file(weights, filename, HUB_ID if weights is None else None, what="HPSv3")
        sd = checkpoint_layout(load_state_dict_file(path, allow_pickle=allow_pickle))  # before any download
        if base is None:
            local = weights is not None and os.path.exists(str(weights))
            base = path.parent if local and (path.parent / "config.json").is_file() else BASE_ID
        try:
            config = _from_pretrained(AutoConfig, base, "HPSv3 (Qwen2-VL config)", "config.json")
            processor = _from_pretrained(AutoProcessor, base, "HPSv3 (Qwen2-VL processor)", "processor files")
        except MissingWeightsError as e:
            raise MissingWeightsError(f"{e} For HPSv3 these Qwen2-VL files (of {BASE_ID}) are passed as base='DIR'; "
                                      "weights= is the HPSv3 state dict.") from e
        if REWARD_TOKEN not in processor.tokenizer.get_vocab():
            processor.tokenizer.add_tokens([REWARD_TOKEN], special_tokens=True)
        embed = sd.get("model.model.language_model.embed_tokens.weight")
        if embed is None:
            raise KeyError(f"HPSv3 ({path.name}): no language-model embedding in the checkpoint; is it an HPSv3 file?")
        text_config = getattr(config, "text_config", config)
        text_config.vocab_size = embed.shape[0]        # the reference resized the embeddings to len(tokenizer)
        reward_id = processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)
        if reward_id >= embed.shape[0]:
            raise ValueError(f"HPSv3 ({path.name}): {REWARD_TOKEN} has id {reward_id} but the checkpoint's vocabulary "
                             f"has {embed.shape[0]} rows: base {str(base)!r} is not the tokenizer HPSv3 was trained with")
        with init_empty_weights():
            model = Qwen2VLForConditionalGeneration(config)
            head = ranknet_head(text_config.hidden_size, out_dim=sd["rm_head.5.weight"].shape[0]
                                if "rm_head.5.weight" in sd else 2)
        holder = nn.Module()
        holder.model, holder.rm_head = model, head
        load_strict(holder, sd, f"HPSv3 ({path.name})", assign=True)
        if getattr(text_config, "tie_word_embeddings", False) or getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        return cls(model, head, processor, **kw)

    # ------------------------------------------------------------------ inputs
    def messages(self, prompt: str, image=None) -> list[dict]:
        """The one-turn conversation of the reference for ``prompt`` (``image`` a PIL image or a placeholder)."""
        return [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": hpsv3_text(prompt, self.instruction)}]}]

    def inputs(self, images: Images, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Processor outputs (``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``pixel_values``,
        ``image_grid_thw``) on
        the model's device; in differentiable mode ``pixel_values`` carry gradients to ``images``."""
        proc = self.processor
        texts = [proc.apply_chat_template(self.messages(p), tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        if self.mode == "exact":
            pil = resize_pil(to_pil(images), self.pixels, self.pixels)
            batch = proc(text=texts, images=pil, padding=True, return_tensors="pt")
        else:
            x = resize_tensor(to_tensor(images).float(), self.pixels, self.pixels)
            mean, std, patch, merge, temporal = image_processor_stats(proc)
            pixel_values, grid = patchify(x, mean, std, patch, merge, temporal)
            n_tokens = [int(g.prod()) // merge ** 2 for g in grid]
            image_token = proc.image_token
            texts = [t.replace(image_token, image_token * n, 1) for t, n in zip(texts, n_tokens)]
            batch = dict(proc.tokenizer(texts, padding=True, return_tensors="pt"))
            batch.update(pixel_values=pixel_values, image_grid_thw=grid,
                         mm_token_type_ids=(batch["input_ids"] == proc.image_token_id).int())
        dev = self.device
        return {k: v.to(dev) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    # ------------------------------------------------------------------ score
    def predict(self, images: Images, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ [B], σ [B])``: the score and the model's uncertainty ``exp(s)``."""
        batch = self.inputs(images, prompts)
        dtype = next(self.model.parameters()).dtype
        out = self.model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               pixel_values=batch["pixel_values"].to(dtype), image_grid_thw=batch["image_grid_thw"],
                               mm_token_type_ids=batch["mm_token_type_ids"])
        is_reward = batch["input_ids"] == self.reward_token_id
        counts = is_reward.sum(-1)
        if not bool((counts == 1).all()):
            raise ValueError(f"HPSv3: each input needs exactly one {REWARD_TOKEN} token, found {counts.tolist()} "
                             "(a prompt containing the token, or a changed instruction?)")
        h = out.last_hidden_state[is_reward]                                   # [B, H]
        logits = self.rm_head(h.float())                                       # [B, 2]
        return logits[:, 0], logits[:, 1].exp()

    def _score(self, images: Images, prompts: list[str]) -> torch.Tensor:
        return self.predict(images, prompts)[0]
