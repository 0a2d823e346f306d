"""The text side's batch source and model for the one training loop (:func:`diffalign.trainers.loop.train`):
:class:`TextData` (tokenised examples, run position → :class:`TextBatch`) and :func:`load_lm_for_training`,
which the text methods' hooks (:class:`diffalign.text.methods.TextMethod`) hand to the engine.

A text recipe reads like an image one::

    model:  {pretrained: Qwen/Qwen2.5-0.5B-Instruct, lora_rank: 16}
    data:   {source: data/pairs.jsonl, format: trl}          # or parquet, or a hub dataset id
    method: {name: text-dpo, beta: 0.1, max_length: 512}
    train:  {output_dir: runs/rewriter-dpo, max_steps: 500, batch_size: 4, learning_rate: 5.0e-6}

The loop gives the rest: ``config.yaml``, ``metrics.jsonl``, atomic ``checkpoints/step-N/``,
``--resume latest``, ``final/`` (a peft adapter folder, or the whole model, plus the tokenizer).
Examples are tokenised once; the examples of a micro-batch are a function of ``(seed, position
in the run)`` only, so a resumed run sees the same data as an unbroken one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffalign.core.positions import EpochOrder, micro_batch_positions
from diffalign.text.data import CompletionExample, PreferenceExample, load_examples
from diffalign.text.logprobs import (
    TokenBatch,
    collate,
    tokenize_completion,
    tokenize_example,
)
from diffalign.trainers.config import Recipe

TEXT_DATA_FORMATS = ("trl",)


@dataclass
class TextBatch:
    """One micro-batch of tokenised rows.

    * ``tokens``: pairs ``[chosen (B); rejected (B)]``; feedback ``[completions (B); mismatched
      completions (B)]`` (row ``B+i`` is prompt ``i`` with completion ``i−1``: KTO's KL estimate);
      completion (SFT) ``[B]``. Each tensor ``[N, S]``.
    * ``weights``: ``[B]`` per-pair (per-sample) loss weights.
    * ``desirable``: ``[B]`` bool (KTO only).
    """

    tokens: TokenBatch
    weights: torch.Tensor
    desirable: torch.Tensor | None = None


@dataclass
class TextData:
    """Tokenised examples and the run-position → micro-batch map (the image loop's scheme)."""

    examples: list
    tokenized: list[tuple]
    kind: str
    tokenizer: object
    max_length: int
    batch_size: int
    gradient_accumulation_steps: int
    seed: int
    dropped: int = 0
    _order: EpochOrder | None = field(default=None, repr=False)

    @classmethod
    def build(cls, examples: list, kind: str, tokenizer, *, max_length: int, batch_size: int,
              gradient_accumulation_steps: int, seed: int, tokenization: str = "dpo") -> TextData:
        """``tokenization``: ``"dpo"`` or ``"cpo"``, which TRL trainer's tokenisation to follow
        (:func:`diffalign.text.logprobs.tokenize_example`)."""
        kept, tokenized = [], []
        for ex in examples:
            if kind == "pairs":
                p, (c, r) = tokenize_example(tokenizer, ex.prompt, [ex.chosen, ex.rejected], tokenization=tokenization)
                tok = (p, c, r)
            else:
                tok = tokenize_completion(tokenizer, ex.prompt, ex.completion, tokenization=tokenization)
            if len(tok[0]) >= max_length:  # TRL drops rows whose prompt alone fills max_length
                continue
            kept.append(ex)
            tokenized.append(tok)
        if not kept:
            raise ValueError(f"no example fits max_length={max_length} (every prompt is as long or longer)")
        if kind == "feedback" and len(kept) < 2:
            raise ValueError("KTO needs at least 2 examples (its KL estimate pairs prompts with other completions)")
        return cls(kept, tokenized, kind, tokenizer, max_length, batch_size, gradient_accumulation_steps, seed,
                   dropped=len(examples) - len(kept))

    def __len__(self) -> int:
        return len(self.examples)

    def positions(self, step: int, micro: int, process: int, num_processes: int) -> list[int]:
        return micro_batch_positions(step, micro, process, num_processes, self.batch_size,
                                     self.gradient_accumulation_steps)

    def index_at(self, position: int) -> int:
        """The example at a run position (each epoch a seeded shuffle)."""
        if self._order is None:
            self._order = EpochOrder(len(self.examples), self.seed, "epoch")
        return self._order(position)

    def batch(self, step: int, micro: int, process: int, num_processes: int) -> TextBatch:
        idx = [self.index_at(p) for p in self.positions(step, micro, process, num_processes)]
        return self.collate(idx)

    def collate(self, idx: list[int]) -> TextBatch:
        """The :class:`TextBatch` of examples ``idx``."""
        pad = self.tokenizer.pad_token_id
        weights = torch.tensor([float(self.examples[i].weight) for i in idx])
        if self.kind == "pairs":
            rows = [(self.tokenized[i][0], self.tokenized[i][1]) for i in idx]
            rows += [(self.tokenized[i][0], self.tokenized[i][2]) for i in idx]
            return TextBatch(collate(rows, pad, self.max_length), weights)
        rows = [self.tokenized[i] for i in idx]
        if self.kind == "completion":
            return TextBatch(collate(rows, pad, self.max_length), weights)
        # feedback: KTO's KL rows pair prompt i with the completion of the previous example in the batch
        # (token ids joined, as TRL's KL_completion_ids)
        shifted = idx[-1:] + idx[:-1]
        kl_rows = [(self.tokenized[i][0], self.tokenized[j][1]) for i, j in zip(idx, shifted)]
        desirable = torch.tensor([bool(self.examples[i].label) for i in idx])
        return TextBatch(collate(rows + kl_rows, pad, self.max_length), weights, desirable)


def load_lm_for_training(recipe: Recipe, accelerator, method_class) -> object:
    """The recipe's causal LM (:class:`~diffalign.text.model.CausalLM`) on the accelerator's device: the
    method's dropout setting, then a LoRA (the adapter-off model is the reference), or full fine-tuning
    (a frozen copy as the reference when the method has one), and gradient checkpointing if asked."""
    from diffalign.text.model import CausalLM
    from diffalign.trainers.distributed import no_zero3_init

    cfg = recipe.train
    if cfg.validation_prompts:
        raise ValueError("train.validation_prompts samples images; text methods have no validation sampling "
                         "(leave it empty)")
    if recipe.data.format not in TEXT_DATA_FORMATS:
        raise ValueError(f"text methods read TRL-format data: set data.format to one of {TEXT_DATA_FORMATS} "
                         f"(got {recipe.data.format!r})")
    if not recipe.model.pretrained:
        raise ValueError("model.pretrained must name a causal LM (hub id or local folder)")
    with no_zero3_init(accelerator):  # whole, as the reference copy must be; prepare shards the policy
        lm = CausalLM.from_pretrained(recipe.model.pretrained, revision=recipe.model.revision,
                                      allow_pickle=recipe.model.allow_pickle)
    if recipe.method.config.disable_dropout:
        lm.disable_dropout()
    lm.to(accelerator.device)
    if recipe.model.lora_rank > 0:
        lm.add_lora(rank=recipe.model.lora_rank, alpha=recipe.model.lora_alpha,
                    target_modules=recipe.model.lora_target_modules)
    elif method_class.uses_reference:
        lm.enable_full_finetune()
    else:
        lm.raw_model.requires_grad_(True)
    if recipe.model.gradient_checkpointing:
        lm.enable_gradient_checkpointing()
    return lm


def load_text_data(recipe: Recipe, method, tokenizer, accelerator=None) -> TextData:
    """The recipe's TRL-format examples of the method's ``data_kind``, tokenised as the method's TRL trainer
    does (rows whose prompt fills ``max_length`` are dropped, and reported)."""
    cfg = recipe.train
    examples = load_examples(recipe.data.source, method.data_kind, split=recipe.data.split,
                             max_samples=recipe.data.max_samples)
    data = TextData.build(examples, method.data_kind, tokenizer, max_length=method.config.max_length,
                          batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                          seed=cfg.seed, tokenization=method.tokenization)
    if data.dropped and (accelerator is None or accelerator.is_main_process):
        print(f"dropped {data.dropped} example(s) whose prompt fills max_length={method.config.max_length}")
    return data


__all__ = ["TextBatch", "TextData", "load_lm_for_training", "load_text_data", "PreferenceExample",
           "CompletionExample"]
