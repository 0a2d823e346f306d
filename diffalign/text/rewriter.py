"""The prompt rewriter: a causal LM that expands a user prompt into a better text-to-image prompt.

    rewriter = PromptRewriter.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct")     # or a trained run's final/
    rewriter.rewrite(["a cat on a sofa"])                                        # [["a fluffy ginger cat ..."]]

How the user prompt reaches the model (:meth:`PromptRewriter.training_prompt`; training data
built by :mod:`diffalign.text.pairs` uses the same, so training and inference agree):

* tokenizer with a chat template: ``[{"role": "system", ...}, {"role": "user", instruction with the
  prompt}]`` through the template, generation prompt on;
* no chat template (GPT-2 style): ``"{prompt} Rephrase:"`` as Promptist does, and the rewrite is
  what follows.

Generation stops at EOS or at the chat template's end of turn (:func:`stop_token_ids`): conversational
training data ends a completion there, with no EOS after it (as TRL). The first non-empty line of the
generated text is the rewrite; an empty generation falls back to the original prompt (as
PromptEnhancer does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from diffalign.text.logprobs import (
    Text,
    has_chat_template,
    render_prompt,
    tokenize_example,
)
from diffalign.text.model import CausalLM

DEFAULT_SYSTEM = ("You rewrite prompts for a text-to-image model. Keep every object, count, colour, attribute "
                  "and spatial relation of the user's prompt; add visual detail that makes a better image. "
                  "Answer with the rewritten prompt only.")
DEFAULT_INSTRUCTION = "Rewrite this prompt: {prompt}"
PLAIN_SUFFIX = " Rephrase:"
FORMAT_FILE = "rewriter.json"


@dataclass
class RewriteConfig:
    """Generation settings (``transformers`` ``generate`` names).

    Attributes:
        max_new_tokens: length cap of a rewrite (77: a CLIP text encoder reads no more).
        do_sample: sample (True) or decode greedily / with beams (False).
        temperature, top_p: sampling knobs.
        num_beams: beam search width when not sampling (Promptist uses 8).
        batch_size: prompts per ``generate`` call.
        seed: sampling seed (rewrites of a batch are a function of it).
    """

    max_new_tokens: int = 77
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    num_beams: int = 1
    batch_size: int = 16
    seed: int = 0


class PromptRewriter:
    """A :class:`~diffalign.text.model.CausalLM` with the rewriting instruction around it.

    Args:
        lm: the language model and tokenizer.
        system: the system message (chat models); ``None`` sends no system message.
        instruction: the user message, with ``{prompt}`` where the user prompt goes.
    """

    def __init__(self, lm: CausalLM, *, system: str | None = DEFAULT_SYSTEM, instruction: str = DEFAULT_INSTRUCTION):
        if "{prompt}" not in instruction:
            raise ValueError("the instruction must contain '{prompt}'")
        self.lm = lm
        self.system = system
        self.instruction = instruction

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, adapter: str | Path | None = None,
                        device: str | torch.device = "cpu", torch_dtype: torch.dtype | None = None,
                        trust_remote_code: bool = False, allow_pickle: bool = False, **kwargs) -> PromptRewriter:
        """A hub id (``Qwen/Qwen2.5-0.5B-Instruct``), a local model folder, or a trained run's
        ``final/`` (peft adapter folder: its base model is loaded and the adapter merged). A
        ``rewriter.json`` in the folder sets ``system``/``instruction`` (keyword arguments win)."""
        lm = CausalLM.from_pretrained(name_or_path, adapter=adapter, torch_dtype=torch_dtype,
                                      trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        lm.to(device)
        lm.model.eval()
        saved = Path(lm.source) / FORMAT_FILE if lm.source is not None else None
        if saved is not None and saved.is_file():
            kwargs = {**json.loads(saved.read_text()), **kwargs}
        return cls(lm, **kwargs)

    def save_format(self, folder: str | Path) -> Path:
        """Write ``rewriter.json`` (system message and instruction) into a model folder; loading the
        folder, and every model trained from it, uses the same format."""
        path = Path(folder) / FORMAT_FILE
        path.write_text(json.dumps({"system": self.system, "instruction": self.instruction}, indent=1))
        return path

    @property
    def tokenizer(self):
        return self.lm.tokenizer

    def training_prompt(self, prompt: str) -> Text:
        """The ``prompt`` field of a TRL-format example for this rewriter (messages or text)."""
        if has_chat_template(self.tokenizer):
            messages = [{"role": "system", "content": self.system}] if self.system else []
            return messages + [{"role": "user", "content": self.instruction.format(prompt=prompt)}]
        return prompt + PLAIN_SUFFIX

    def completion(self, rewrite: str) -> Text:
        """The ``chosen``/``rejected``/``completion`` field for a rewrite (matches :meth:`training_prompt`)."""
        if has_chat_template(self.tokenizer):
            return [{"role": "assistant", "content": rewrite}]
        return " " + rewrite

    @torch.no_grad()
    def rewrite(self, prompts: list[str], *, num_return_sequences: int = 1,
                config: RewriteConfig | None = None) -> list[list[str]]:
        """``num_return_sequences`` rewrites of each prompt: ``[len(prompts)][num_return_sequences]``."""
        cfg = config or RewriteConfig()
        tok, model = self.tokenizer, self.lm.raw_model
        if not cfg.do_sample and num_return_sequences > max(1, cfg.num_beams):
            raise ValueError(f"{num_return_sequences} rewrites per prompt need do_sample=True or num_beams >= "
                             f"{num_return_sequences}")
        old_side = tok.padding_side
        tok.padding_side = "left"
        out: list[list[str]] = []
        try:
            for start in range(0, len(prompts), cfg.batch_size):
                chunk = prompts[start:start + cfg.batch_size]
                texts = [render_prompt(tok, self.training_prompt(p)) for p in chunk]
                special = not has_chat_template(tok)
                enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=special).to(self.lm.device)
                torch.manual_seed(cfg.seed + start)
                gen_kwargs = dict(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.do_sample,
                                  num_return_sequences=num_return_sequences, pad_token_id=tok.pad_token_id,
                                  eos_token_id=stop_token_ids(tok))
                if cfg.do_sample:
                    gen_kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p)
                else:
                    gen_kwargs.update(num_beams=max(cfg.num_beams, num_return_sequences))
                ids = model.generate(**enc, **gen_kwargs)
                new = ids[:, enc["input_ids"].shape[1]:]
                decoded = tok.batch_decode(new, skip_special_tokens=True)
                for i, p in enumerate(chunk):
                    out.append([clean_rewrite(d, p) for d in decoded[i * num_return_sequences:(i + 1) * num_return_sequences]])
        finally:
            tok.padding_side = old_side
        return out


def stop_token_ids(tokenizer) -> list[int]:
    """EOS and the special tokens the chat template writes after an assistant message (Qwen's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``): a model trained on conversational data (no EOS after
    the end of turn, as TRL) ends its answer with them."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if has_chat_template(tokenizer):
        try:
            _, (tail,) = tokenize_example(tokenizer, [{"role": "user", "content": "a"}],
                                          [[{"role": "assistant", "content": "a"}]])
        except Exception:  # a template that cannot render this dummy turn: EOS only
            tail = []
        skip = {tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id}
        ids += [t for t in tail if t in set(tokenizer.all_special_ids) - skip and t not in ids]
    return ids


def clean_rewrite(text: str, original: str) -> str:
    """The first non-empty line of a generation, whitespace-normalised; the original if empty."""
    for line in text.splitlines():
        line = " ".join(line.split())
        if line:
            return line
    return original
