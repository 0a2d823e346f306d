"""FiFA's text-quality term: rate each prompt with a causal LM judge, cached as ``{prompt: rating}`` JSON.

    diffalign data rate-prompts PAIRS.parquet ratings.json --model Qwen/Qwen2.5-1.5B-Instruct
    diffalign data fifa PAIRS.parquet OUT.parquet --budget 0.2 --reward pickscore --quality ratings.json

The judge reads :data:`RATING_PROMPT` with the prompt filled in (through the tokenizer's chat template
when it has one, as the user's turn) and the rating is the expectation of its next-token distribution
over the digits 0–9, scaled to [0, 1]::

    q = Σ_d d·p(d) / 9,   p(d) = softmax over the digit tokens of the next-token logits

(a digit may be one token with or without a leading space; both count). Each distinct prompt is rated
once. The paper's judge, its instruction and its scale are unverified (docs/methods/fifa.md).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from diffalign.data.files import atomic_write

RATING_PROMPT = ("Rate the following text-to-image prompt from 0 to 9: 0 if it is harmful, offensive or "
                 "meaningless, 9 if it is safe, clear and describes an image well. Answer with one digit.\n"
                 "Prompt: {prompt}\nRating:")


def digit_token_ids(tokenizer) -> list[list[int]]:
    """For each digit 0–9, the single-token ids that spell it (``"d"`` and ``" d"``); an error if a digit
    has none."""
    out = []
    for d in range(10):
        ids = set()
        for text in (str(d), f" {d}"):
            enc = tokenizer.encode(text, add_special_tokens=False)
            if len(enc) == 1 and enc[0] != tokenizer.unk_token_id:
                ids.add(enc[0])
        if not ids:
            raise ValueError(f"the judge's tokenizer has no single token for the digit {d}")
        out.append(sorted(ids))
    return out


def _render(tokenizer, text: str) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True))
    return tokenizer.encode(text)


@torch.no_grad()
def rate_prompts(prompts: Sequence[str], model, tokenizer, *, template: str = RATING_PROMPT,
                 batch_size: int = 8) -> dict[str, float]:
    """``{prompt: q}`` with ``q = Σ_d d·p(d) / 9`` in [0, 1] (module docstring), for each distinct prompt."""
    if "{prompt}" not in template:
        raise ValueError("the rating template must contain {prompt}")
    digits = digit_token_ids(tokenizer)
    unique = list(dict.fromkeys(prompts))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[str, float] = {}
    for start in range(0, len(unique), batch_size):
        chunk = unique[start:start + batch_size]
        rows = [_render(tokenizer, template.format(prompt=p)) for p in chunk]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # right-padded; the next token is read at each row's last real token
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        last = logits[torch.arange(len(rows)), mask.sum(1).to(device) - 1]  # [b, V]
        logp = torch.log_softmax(last, dim=-1)
        per_digit = torch.stack([torch.logsumexp(logp[:, d], dim=-1) for d in digits], dim=-1)  # [b, 10]
        p = torch.softmax(per_digit, dim=-1)
        q = (p * torch.arange(10, device=p.device, dtype=p.dtype)).sum(-1) / 9
        out.update({prompt: float(v) for prompt, v in zip(chunk, q.cpu())})
    return out


def load_judge(name_or_path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of a causal LM (safetensors only, no remote code)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    model = AutoModelForCausalLM.from_pretrained(str(name_or_path), torch_dtype=dtype, use_safetensors=True)
    return model.to(device).eval(), tokenizer


def read_prompts(source: str | os.PathLike) -> list[str]:
    """The prompts of a ``.txt`` file (one a line) or the ``caption`` column of Pick-a-Pic parquet file(s)."""
    path = Path(source)
    if path.suffix == ".txt":
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    import pyarrow.parquet as pq

    from diffalign.data.pickapic import resolve_sources

    files = resolve_sources(str(source), split=None)
    if files is None:
        raise ValueError(f"{source}: a hub dataset id; download its parquet files and rate those")
    out = []
    for f in files:
        out += [c for c in pq.read_table(f, columns=["caption"]).column("caption").to_pylist() if isinstance(c, str)]
    return out


def write_ratings(ratings: dict[str, float], out: str | os.PathLike) -> Path:
    """``{prompt: rating}`` as JSON, atomically (what ``diffalign data fifa --quality`` reads)."""
    return atomic_write(out, lambda tmp: tmp.write_text(json.dumps(ratings, indent=1, ensure_ascii=False)))
