"""Sequence log-probs of completions under any causal LM, prompt tokens masked.

A row is ``prompt tokens + completion tokens`` (right-padded). Only completion tokens count:

    log π(y | x) = Σ_{t ∈ completion} log softmax(logits_{t−1})[ids_t]        (``sum``)
    mean log-prob = the sum / |y|                                             (``mean``, SimPO/ORPO/IPO)

as TRL's DPO trainer computes them (logits shifted by one, a ``completion_mask`` selects tokens).

Tokenisation follows TRL too: a *standard* example (strings) is tokenised as ``prompt`` and
``prompt + completion`` and the completion ids are the tail of the second; a *conversational*
example (lists of ``{"role", "content"}`` messages) goes through the tokenizer's chat template, the
prompt with ``add_generation_prompt=True``. EOS ends every completion.
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


def _ids(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def tokenize_completion(tokenizer, prompt: Text, completion: Text) -> tuple[list[int], list[int]]:
    """``(prompt_ids, completion_ids)`` of one example (standard or conversational), EOS appended
    to the completion when the tokenizer has one and it is missing."""
    if is_conversational(prompt) != is_conversational(completion):
        raise ValueError("prompt and completion must both be strings or both be lists of messages")
    if is_conversational(prompt):
        prompt_text = render_prompt(tokenizer, prompt)
        full_text = tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False)
        special = False  # the template writes BOS itself
    else:
        prompt_text, full_text, special = prompt, prompt + completion, True
    prompt_ids = _ids(tokenizer, prompt_text, special)
    full_ids = _ids(tokenizer, full_text, special)
    if full_ids[:len(prompt_ids)] == prompt_ids:
        completion_ids = full_ids[len(prompt_ids):]
    else:  # the tokenisation of the prompt is not a prefix of the whole: tokenise the tail alone
        warnings.warn("the prompt's tokens are not a prefix of prompt+completion's; tokenising the completion "
                      "on its own", stacklevel=2)
        tail = full_text[len(prompt_text):] if full_text.startswith(prompt_text) else str(completion)
        completion_ids = _ids(tokenizer, tail, False)
    eos = tokenizer.eos_token_id
    if eos is not None and (not completion_ids or completion_ids[-1] != eos):
        completion_ids.append(eos)
    return prompt_ids, completion_ids


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
    per-token values ``tokens`` ``[N, S−1]`` (0 outside the completion)."""

    sum: torch.Tensor
    mean: torch.Tensor
    num_tokens: torch.Tensor
    tokens: torch.Tensor


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[targets]`` ``[N, S]`` from logits ``[N, S, V]`` without materialising the
    full log-softmax (gather minus logsumexp, in fp32)."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(model, batch: TokenBatch) -> SequenceLogProbs:
    """Completion log-probs of every row of ``batch`` under ``model`` (an ``AutoModelForCausalLM``,
    possibly peft- or DDP-wrapped). Gradients flow when enabled."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    per_token = token_logprobs(logits[:, :-1], batch.input_ids[:, 1:])
    mask = batch.completion_mask[:, 1:].to(per_token.dtype)
    per_token = per_token * mask
    n = mask.sum(-1)
    total = per_token.sum(-1)
    return SequenceLogProbs(total, total / n.clamp_min(1), n, per_token)
