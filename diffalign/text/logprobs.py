"""Sequence log-probs of completions under any causal LM, prompt tokens masked.

A row is ``prompt tokens + completion tokens`` (right-padded). Only completion tokens count:

    log π(y | x) = Σ_{t ∈ completion} log softmax(logits_{t−1})[ids_t]        (``sum``)
    mean log-prob = the sum / |y|                                             (``mean``, SimPO/ORPO/IPO)

as TRL's DPO trainer computes them (logits shifted by one, a ``completion_mask`` selects tokens).

Tokenisation follows TRL 1.16 too (:func:`tokenize_example`): a *standard* example (strings) is
tokenised as ``prompt`` and ``prompt + completion`` and the completion ids are the tail of the
second; a *conversational* example (lists of ``{"role", "content"}`` messages) goes through the
tokenizer's chat template, the prompt with ``add_generation_prompt=True``. EOS is appended to
plain-string completions only (DPO, KTO), or to every completion (TRL's CPO/ORPO trainers: SimPO,
ORPO).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

Messages = list[dict[str, Any]]
Text = str | Messages


def is_conversational(value: Any) -> bool:
    """A list of ``{"role", "content"}`` messages (TRL's conversational format)."""
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: Text) -> str:
    """The prompt as the model reads it: the chat template (with the generation prompt) for
    messages, the string itself otherwise."""
    if is_conversational(prompt):
        if not has_chat_template(tokenizer):
            raise ValueError("conversational data needs a tokenizer with a chat template (tokenizer.chat_template)")
        return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt


TOKENIZATIONS = ("dpo", "cpo")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _chat_ids(tokenizer, messages: Messages, **kwargs) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def _common_string_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def tokenize_example(tokenizer, prompt: Text, completions: list[Text], *,
                     tokenization: str = "dpo") -> tuple[list[int], list[list[int]]]:
    """``(prompt_ids, [completion_ids, ...])`` of one prompt and its completions, as TRL 1.16 tokenises.

    ``tokenization``:

    * ``"dpo"`` (TRL's ``DPOTrainer`` and ``KTOTrainer``): EOS (the token's string) is appended to a
      *plain-string* completion that lacks it; conversational completions get none (the chat template
      ends the turn). Strings are tokenised with the tokenizer's special tokens (e.g. BOS), messages
      through ``apply_chat_template`` (the prompt with ``add_generation_prompt=True``).
    * ``"cpo"`` (TRL's ``CPOTrainer``/``ORPOTrainer``, so SimPO and ORPO): messages are first rendered
      to strings by the chat template (the prompt is the common prefix of the rendered prompt and
      prompt + completion), strings are tokenised without special tokens, then BOS is prepended when
      the tokenizer has one and the prompt lacks it, and the EOS id is appended to *every* completion
      that lacks it (conversational ones too).

    The completion starts where the prompt's tokens and prompt + completion's tokens diverge (over all
    completions, so they share one prompt), as TRL's ``common_prefix_length``; the two differ only
    where tokens merge across the boundary.
    """
    if tokenization not in TOKENIZATIONS:
        raise ValueError(f"unknown tokenization {tokenization!r}; choose from {TOKENIZATIONS}")
    conversational = is_conversational(prompt)
    for c in completions:
        if is_conversational(c) != conversational:
            raise ValueError("prompt and completion must both be strings or both be lists of messages")
    if conversational and not has_chat_template(tokenizer):
        raise ValueError("conversational data needs a tokenizer with a chat template (tokenizer.chat_template)")
    eos = tokenizer.eos_token
    if tokenization == "dpo":
        if conversational:
            prompt_ids = _chat_ids(tokenizer, list(prompt), add_generation_prompt=True)
            full = [_chat_ids(tokenizer, list(prompt) + list(c)) for c in completions]
        else:
            if eos is not None:
                completions = [c if c.endswith(eos) else c + eos for c in completions]
            prompt_ids = _ids(tokenizer, prompt, True)
            full = [_ids(tokenizer, prompt + c, True) for c in completions]
    else:
        if conversational:
            prompt_text = render_prompt(tokenizer, prompt)
            texts = [tokenizer.apply_chat_template(list(prompt) + list(c), tokenize=False) for c in completions]
            for t in texts:
                prompt_text = _common_string_prefix(prompt_text, t)
            completions = [t[len(prompt_text):] for t in texts]
            prompt = prompt_text
        prompt_ids = _ids(tokenizer, prompt, False)
        full = [_ids(tokenizer, prompt + c, False) for c in completions]
        bos = tokenizer.bos_token_id
        if bos is not None:
            if not prompt_ids or prompt_ids[0] != bos:
                prompt_ids = [bos] + prompt_ids
            full = [f if f and f[0] == bos else [bos] + f for f in full]
    n = min([len(prompt_ids)] + [_common_prefix(prompt_ids, f) for f in full])
    if n < len(prompt_ids):
        warnings.warn("the prompt's tokens are not a prefix of prompt+completion's; the completion starts where "
                      f"they diverge (as TRL), leaving out {tokenizer.decode(prompt_ids[n:])!r}", stacklevel=2)
    completion_ids = [f[n:] for f in full]
    if tokenization == "cpo" and tokenizer.eos_token_id is not None:
        completion_ids = [c if c and c[-1] == tokenizer.eos_token_id else c + [tokenizer.eos_token_id]
                          for c in completion_ids]
    return prompt_ids[:n], completion_ids


def tokenize_completion(tokenizer, prompt: Text, completion: Text, *,
                        tokenization: str = "dpo") -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)`` of one example (standard or conversational); see
    :func:`tokenize_example`."""
    prompt_ids, (completion_ids,) = tokenize_example(tokenizer, prompt, [completion], tokenization=tokenization)
    return prompt_ids, completion_ids


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


@dataclass
class TokenBatch:
    """Right-padded rows: ``input_ids``, ``attention_mask``, ``completion_mask`` all ``[N, S]``
    (``completion_mask`` is 1 on completion tokens, 0 on prompt and padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    def to(self, device) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device))


def collate(rows: list[tuple[list[int], list[int]]], pad_token_id: int, max_length: int | None = None) -> TokenBatch:
    """Rows of ``(prompt_ids, completion_ids)`` → a right-padded :class:`TokenBatch`; rows longer
    than ``max_length`` lose the end of their completion (TRL's ``keep_start``)."""
    seqs, masks = [], []
    for prompt_ids, completion_ids in rows:
        ids = list(prompt_ids) + list(completion_ids)
        mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
        if max_length is not None:
            ids, mask = ids[:max_length], mask[:max_length]
        seqs.append(ids)
        masks.append(mask)
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    completion = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention[i, :len(s)] = 1
        completion[i, :len(m)] = torch.tensor(m)
    return TokenBatch(input_ids, attention, completion)


@dataclass
class SequenceLogProbs:
    """Per-row completion log-probs: ``sum`` and ``mean`` ``[N]``, ``num_tokens`` ``[N]``, and the
    per-token values ``tokens`` ``[N, S−1]`` (0 outside the completion). ``full_sum`` and
    ``full_num_tokens`` ``[N]`` count every attended token after the first, prompt included (the NLL
    of TRL's ``ORPOTrainer``)."""

    sum: torch.Tensor
    mean: torch.Tensor
    num_tokens: torch.Tensor
    tokens: torch.Tensor
    full_sum: torch.Tensor | None = None
    full_num_tokens: torch.Tensor | None = None


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[targets]`` ``[N, S]`` from logits ``[N, S, V]`` without materialising the
    full log-softmax (gather minus logsumexp, in fp32)."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(model, batch: TokenBatch) -> SequenceLogProbs:
    """Completion log-probs of every row of ``batch`` under ``model`` (an ``AutoModelForCausalLM``,
    possibly peft- or DDP-wrapped). Gradients flow when enabled."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    all_tokens = token_logprobs(logits[:, :-1], batch.input_ids[:, 1:])
    attended = batch.attention_mask[:, 1:].to(all_tokens.dtype)
    mask = batch.completion_mask[:, 1:].to(all_tokens.dtype)
    per_token = all_tokens * mask
    n = mask.sum(-1)
    total = per_token.sum(-1)
    return SequenceLogProbs(total, total / n.clamp_min(1), n, per_token,
                            full_sum=(all_tokens * attended).sum(-1), full_num_tokens=attended.sum(-1))
