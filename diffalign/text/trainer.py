"""Text methods on the shared accelerate loop: ``train(recipe)`` = ``loop.train(recipe, setup_fn=setup)``.

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
from pathlib import Path

import torch

from diffalign.text.data import CompletionExample, PreferenceExample, load_examples
from diffalign.text.logprobs import collate, tokenize_completion
from diffalign.text.methods import TextBatch, TextMethod, build_text_method
from diffalign.trainers.config import Recipe
from diffalign.trainers.data import _stable_seed as stable_seed

TEXT_DATA_FORMATS = ("trl",)


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
    _perm: dict = field(default_factory=dict)

    @classmethod
    def build(cls, examples: list, kind: str, tokenizer, *, max_length: int, batch_size: int,
              gradient_accumulation_steps: int, seed: int) -> TextData:
        kept, tokenized = [], []
        for ex in examples:
            if kind == "pairs":
                p, c = tokenize_completion(tokenizer, ex.prompt, ex.chosen)
                _, r = tokenize_completion(tokenizer, ex.prompt, ex.rejected)
                tok = (p, c, r)
            else:
                tok = tokenize_completion(tokenizer, ex.prompt, ex.completion)
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
        per_step = self.batch_size * self.gradient_accumulation_steps * num_processes
        start = step * per_step + (micro * num_processes + process) * self.batch_size
        return list(range(start, start + self.batch_size))

    def index_at(self, position: int) -> int:
        epoch, i = divmod(position, len(self.examples))
        if epoch not in self._perm:
            g = torch.Generator().manual_seed(stable_seed(self.seed, "epoch", epoch))
            self._perm = {epoch: torch.randperm(len(self.examples), generator=g).tolist()}
        return self._perm[epoch][i]

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
        shifted = idx[-1:] + idx[:-1]
        kl_rows = [tokenize_completion(self.tokenizer, self.examples[i].prompt, self.examples[j].completion)
                   for i, j in zip(idx, shifted)]
        desirable = torch.tensor([bool(self.examples[i].label) for i in idx])
        return TextBatch(collate(rows + kl_rows, pad, self.max_length), weights, desirable)


def setup(recipe: Recipe, accelerator=None):
    """Model (+ LoRA or a frozen reference copy), method, tokenised data, optimizer: a loop ``Run``."""
    from accelerate.utils import set_seed

    from diffalign.text.model import CausalLM
    from diffalign.trainers.distributed import no_zero3_init
    from diffalign.trainers.loop import Run, make_accelerator, setup_optimizer

    cfg = recipe.train
    if cfg.validation_prompts:
        raise ValueError("train.validation_prompts samples images; text methods have no validation sampling "
                         "(leave it empty)")
    if recipe.data.format not in TEXT_DATA_FORMATS:
        raise ValueError(f"text methods read TRL-format data: set data.format to one of {TEXT_DATA_FORMATS} "
                         f"(got {recipe.data.format!r})")
    if not recipe.model.pretrained:
        raise ValueError("model.pretrained must name a causal LM (hub id or local folder)")
    accelerator = accelerator or make_accelerator(recipe)
    set_seed(cfg.seed)
    with no_zero3_init(accelerator):  # whole, as the reference copy must be; prepare shards the policy
        lm = CausalLM.from_pretrained(recipe.model.pretrained, revision=recipe.model.revision)
    method: TextMethod = build_text_method(recipe.method, lm)
    if method.config.disable_dropout:
        lm.disable_dropout()
    lm.to(accelerator.device)
    if recipe.model.lora_rank > 0:
        lm.add_lora(rank=recipe.model.lora_rank, alpha=recipe.model.lora_alpha,
                    target_modules=recipe.model.lora_target_modules)
    elif method.uses_reference:
        lm.enable_full_finetune()
    else:
        lm.raw_model.requires_grad_(True)
    if recipe.model.gradient_checkpointing:
        lm.enable_gradient_checkpointing()
    examples = load_examples(recipe.data.source, method.data_kind, split=recipe.data.split,
                             max_samples=recipe.data.max_samples)
    data = TextData.build(examples, method.data_kind, lm.tokenizer, max_length=method.config.max_length,
                          batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                          seed=cfg.seed)
    if data.dropped and accelerator.is_main_process:
        print(f"dropped {data.dropped} example(s) whose prompt fills max_length={method.config.max_length}")
    optimizer, lr_scheduler = setup_optimizer(recipe, accelerator, lm)
    return Run(recipe, accelerator, lm, method, data, optimizer, lr_scheduler, Path(cfg.output_dir))


def train(recipe: Recipe) -> Path:
    """Train a text recipe (methods of :data:`diffalign.text.methods.TEXT_METHODS`) to the end;
    returns the run directory (``final/`` holds the adapter or model and the tokenizer)."""
    from diffalign.trainers.loop import train as loop_train

    return loop_train(recipe, setup_fn=setup)


__all__ = ["TextData", "setup", "train", "PreferenceExample", "CompletionExample"]
