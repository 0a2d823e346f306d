"""Tiny random Qwen2-VL / Qwen2.5-VL checkpoints, saved offline in their published layouts.

The tokenizer is a byte-level BPE trained here on a few sentences (Qwen's special tokens first), the
processor a real ``Qwen2VLProcessor`` / ``Qwen2_5_VLProcessor`` with Qwen's chat template structure
(system turn, ``<|vision_start|><|image_pad|><|vision_end|>`` per image). The models have the real
classes with two text layers and one vision block (patch 14, merge 2, as the real ones).
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
           "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CORPUS = ["You are a helpful assistant.", "Final Score: 4", "Image 1 is better.", "Image 2 is better.",
          "Both images are equally good.", "a red circle and two blue squares", "Textual prompt - a cat",
          "Please provide the overall ratings of this image:", "Evaluate the visual quality of this image."]


def make_tokenizer():
    """A byte-level BPE ``PreTrainedTokenizerFast`` (about 300 tokens; ids 0..7 are Qwen's special tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def make_processor(kind: str = "qwen2_vl"):
    """A real Qwen2-VL (or Qwen2.5-VL) processor around :func:`make_tokenizer`."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    if kind == "qwen2_vl":
        from transformers import Qwen2VLProcessor as Processor
    else:
        from transformers import Qwen2_5_VLProcessor as Processor
    return Processor(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
                     tokenizer=make_tokenizer(), chat_template=CHAT_TEMPLATE)


def make_config(tokenizer, kind: str = "qwen2_vl", vocab_size: int | None = None):
    """A tiny ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig`` (hidden 32, 2 text layers, 1 vision block)."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = dict(vocab_size=vocab_size or len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    tokens = dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                  vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))
    if kind == "qwen2_vl":
        vision = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    vision = dict(depth=1, hidden_size=32, out_hidden_size=32, intermediate_size=64, num_heads=2,
                  fullatt_block_indexes=[0], window_size=56)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)


def to_transformers4_keys(sd: dict) -> dict:
    """The transformers-4 layout the published checkpoints use: ``model.visual.*`` -> ``visual.*``,
    ``model.language_model.*`` -> ``model.*``."""
    out = {}
    for k, v in sd.items():
        if k.startswith("model.visual."):
            k = k[len("model."):]
        elif k.startswith("model.language_model."):
            k = "model." + k[len("model.language_model."):]
        out[k] = v.contiguous()
    return out


def save_hpsv3(folder: Path, seed: int = 0, with_base: bool = True) -> tuple[Path, Path]:
    """A tiny HPSv3: ``folder/hpsv3/HPSv3.safetensors`` (the full state dict in the transformers-4 layout,
    embeddings sized for the tokenizer plus ``<|Reward|>``, a ranknet head 32-1024-16-2) and the base
    Qwen2-VL files (config, tokenizer, processor; no weights) in ``folder/base`` -- or, with
    ``with_base``, also next to the weights. Returns ``(hpsv3 folder, base folder)``."""
    from safetensors.torch import save_file
    from transformers import Qwen2VLForConditionalGeneration

    from diffalign.rewards.hpsv3 import ranknet_head

    base = folder / "base"
    processor = make_processor("qwen2_vl")
    config = make_config(processor.tokenizer, "qwen2_vl")
    processor.save_pretrained(base)
    config.save_pretrained(base)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(make_config(processor.tokenizer, "qwen2_vl",
                                                        vocab_size=len(processor.tokenizer) + 1))
    head = ranknet_head(32)
    with torch.no_grad():          # a head whose output moves with its input (random init is near 0)
        for p in head.parameters():
            p.mul_(4.0)
    sd = to_transformers4_keys(model.state_dict())
    sd.update({f"rm_head.{k}": v.contiguous() for k, v in head.state_dict().items()})
    out = folder / "hpsv3"
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "HPSv3.safetensors"))
    if with_base:
        processor.save_pretrained(out)
        config.save_pretrained(out)
    return out, base


def save_unified_reward(folder: Path, seed: int = 0, script: str | None = None) -> Path:
    """A tiny UnifiedReward judge: a random ``Qwen2_5_VLForConditionalGeneration`` saved with its processor
    (``config.json`` + ``model.safetensors`` with the transformers-4 key names the hub checkpoints have). With ``script``, the
    model is made to answer exactly that text under greedy decoding (:func:`script_answer`)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    processor = make_processor("qwen2_5_vl")
    config = make_config(processor.tokenizer, "qwen2_5_vl")
    config.tie_word_embeddings = False
    config.text_config.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    if script is not None:
        script_answer(model, processor.tokenizer, script)
    model.save_pretrained(folder)
    # the hub checkpoints were written by transformers 4.x: visual.*, model.layers.*, lm_head.*
    from safetensors.torch import save_file

    save_file(to_transformers4_keys(model.state_dict()), str(folder / "model.safetensors"), metadata={"format": "pt"})
    processor.save_pretrained(folder)
    return folder


def script_answer(model, tokenizer, answer: str) -> None:
    """Make greedy decoding after the generation prompt (which ends in ``"\\n"``) write ``answer`` then
    ``<|im_end|>``: with every attention and MLP output projection zeroed, the last hidden state is the
    (normalised) embedding of the current token, so the next token is a function of the current one, and
    each ``lm_head`` row of the wanted next token is set along the embedding of its predecessor."""
    lm = model.model.language_model
    chain = tokenizer.encode("\n", add_special_tokens=False) + tokenizer.encode(answer, add_special_tokens=False)
    if len(set(chain)) != len(chain):
        raise ValueError(f"answer {answer!r} repeats a token; the scripted judge needs distinct tokens")
    chain.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    with torch.no_grad():
        for layer in lm.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb = lm.embed_tokens.weight
        for prev, nxt in zip(chain[:-1], chain[1:]):
            model.lm_head.weight[nxt] = 30.0 * emb[prev] / emb[prev].norm()
