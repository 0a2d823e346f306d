"""Tiny random causal LMs and word-level tokenizers for the text tests (imported by name, as
tests/eval does with eval_helpers)."""

from __future__ import annotations

import torch

WORDS = ["a", "photo", "of", "circle", "square", "triangle", "red", "green", "blue", "yellow", "purple", "and", "left", "right", "of", "above", "below", "two", "three", "four", "circles", "squares", "triangles", "rewrite", "this", "prompt", "good", "bad", "the", "big", "small"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def make_tokenizer(chat: bool = True):
    """A word-level ``PreTrainedTokenizerFast``: ids 0..4 are pad, unk, bos, eos and ``<|end|>``; BOS is
    prepended (not by the chat template, which writes its own role markers)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<s>", "</s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(special + list(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=special[4:])
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(tokenizer, seed: int = 0, kind: str = "llama"):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
        return GPT2LMHeadModel(cfg)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg)
