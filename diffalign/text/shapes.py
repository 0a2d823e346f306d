"""The prompt rewriter end to end on the Shapes world, offline, on a CPU.

    diffalign rewrite shapes --out runs/shapes-rewriter

1. A tiny Llama-architecture LM (random init) with a word-level tokenizer over the Shapes vocabulary
   and a chat template: the "rewriter".
2. SFT (``pipelines/shapes-rewriter-sft.yaml``) on (caption → rewrite) pairs of *train-split*
   captions, where a rewrite keeps every claim of the caption: the caption itself, its two objects
   swapped (two objects, colour attribution), the relation inverted (position), or colours added
   to uncoloured objects.
3. Pairs (:func:`diffalign.text.pairs.build_pairs`): the SFT rewriter samples candidates, the
   bundled base T2I model renders each, ShapesEval scores the images **against the original
   caption**; best vs worst per caption.
4. DPO (``pipelines/shapes-rewriter-dpo.yaml``) from the SFT model (its reference).
5. Held out: (a) pairs built the same way on held-out captions: does DPO raise
   ``log π(y_w) − log π(y_l)`` above the SFT model's? (b) ShapesEval (against the original
   captions) of images from the SFT and DPO rewrites vs the unrewritten captions, same seeds.

``results.json`` in the output folder holds every number.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from diffalign.text.pairs import PairConfig
from diffalign.text.rewriter import RewriteConfig

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def shapes_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over the Shapes vocabulary, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from diffalign.shapes.tokenizer import WORDS

    vocab = {w: i for i, w in enumerate(dict.fromkeys(SPECIAL + [w.lower() for w in WORDS]))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=SPECIAL[4:])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_lm(tokenizer, seed: int = 0, hidden_size: int = 64, layers: int = 2):
    """A random-init ``LlamaForCausalLM`` sized for the Shapes vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(cfg)


def equivalent_rewrites(text: str) -> list[str]:
    """Captions that keep every claim of a Shapes caption (the caption first)."""
    from diffalign.shapes.grammar import parse_prompt
    from diffalign.shapes.scene import COLORS

    p = parse_prompt(text)
    inc = p.include
    out = [p.text]
    colours = list(COLORS)
    if p.task in ("two_object", "color_attr"):
        a, b = inc
        out.append(_two(b, a))
    if p.task == "position":
        ref, obj = inc  # caption: "<obj> <relation> <ref>"
        out.append(f"a photo of a {ref['class']} {INVERSE[p.position[0]]} a {obj['class']}")
    if p.task in ("single_object", "two_object"):
        rng = random.Random(p.text)
        cs = rng.sample(colours, len(inc))
        out.append(_two(*[dict(i, color=c) for i, c in zip(inc, cs)]) if len(inc) == 2
                   else f"a photo of a {cs[0]} {inc[0]['class']}")
    return list(dict.fromkeys(out))


def _two(a: dict, b: dict) -> str:
    def noun(i):
        return f"{i['color']} {i['class']}" if i.get("color") else i["class"]

    return f"a photo of a {noun(a)} and a {noun(b)}"


@dataclass
class ShapesRewriterConfig:
    """The Shapes rewriter run (defaults: the README's run).

    Attributes:
        out: output folder.
        train_per_task, heldout_per_task: captions per GenEval task from each split.
        sft_steps, dpo_steps: optimizer steps of the two stages (the recipes give the rest).
        pairs: candidate sampling, rendering and scoring (:class:`PairConfig`).
        eval_seeds: images per held-out caption in the image evaluation.
        overrides: extra ``--section.key=value`` for both recipes.
        threads: ``torch.set_num_threads``.
    """

    out: str = "runs/shapes-rewriter"
    seed: int = 0
    train_per_task: int = 40
    heldout_per_task: int = 6
    sft_steps: int = 1500
    dpo_steps: int = 100
    pairs: PairConfig = field(default_factory=lambda: PairConfig(
        num_candidates=6, images_per_candidate=2, rewards={"shapes-eval": 1.0}, num_inference_steps=20,
        guidance_scale=5.0, sampling=RewriteConfig(do_sample=True, temperature=1.0, max_new_tokens=16)))
    eval_seeds: int = 4
    overrides: list[str] = field(default_factory=list)
    threads: int | None = None


def _load_recipe(name: str, overrides: list[str]):
    from diffalign.trainers.registry import load_recipe

    return load_recipe(name, overrides)


def pair_margins(model_dir: Path, rows: list[dict]) -> torch.Tensor:
    """``log π(y_w|x) − log π(y_l|x)`` ``[P]`` of pair rows under the model in ``model_dir``."""
    from diffalign.text.batches import TextData
    from diffalign.text.data import preference_example
    from diffalign.text.model import CausalLM

    lm = CausalLM.from_pretrained(model_dir)
    lm.model.eval()
    ex = [preference_example(r, f"row {i}") for i, r in enumerate(rows)]
    data = TextData.build(ex, "pairs", lm.tokenizer, max_length=64, batch_size=len(ex),
                          gradient_accumulation_steps=1, seed=0)
    with torch.no_grad():
        lp = lm.logprobs(data.collate(list(range(len(ex)))).tokens).sum
    w, l = lp.chunk(2)
    return w - l


def pair_rewards(cfg: ShapesRewriterConfig) -> dict:
    """``{name: reward}`` of ``cfg.pairs.rewards``, each loaded with its ``reward_options``."""
    from diffalign.rewards import load_reward

    return {name: load_reward(name, **cfg.pairs.reward_options.get(name, {})) for name in cfg.pairs.rewards}


def train_sft_and_pairs(cfg: ShapesRewriterConfig, out: Path, pipe, rewards: dict) -> tuple[Path, list[dict], dict]:
    """Stages 1–3 in ``out``: the tiny rewriter, SFT on claim-preserving rewrites of ``cfg.seed``'s train
    captions, then DPO pairs of the SFT model's sampled rewrites rendered by ``pipe`` and scored by
    ``rewards`` against the original caption (``out/pairs.jsonl``). Returns (SFT ``final/``, pair rows,
    pair summary); raises if every candidate of every caption tied."""
    from diffalign.shapes.grammar import prompt_set
    from diffalign.text.data import write_jsonl
    from diffalign.text.pairs import build_pairs
    from diffalign.text.rewriter import PromptRewriter
    from diffalign.trainers.registry import run_recipe as train

    out.mkdir(parents=True, exist_ok=True)
    train_prompts = list(dict.fromkeys(p.text for p in prompt_set("train", cfg.train_per_task, seed=cfg.seed)))
    # 1. the tiny rewriter
    tok = shapes_tokenizer()
    base_dir = out / "base-lm"
    make_tiny_lm(tok, seed=cfg.seed).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    fmt = PromptRewriter(_TokOnly(tok), system=None, instruction="{prompt}")
    fmt.save_format(base_dir)  # the SFT and DPO models inherit it

    # 2. SFT on claim-preserving rewrites of train captions
    sft_rows = [{"prompt": fmt.training_prompt(x), "completion": fmt.completion(y)}
                for x in train_prompts for y in equivalent_rewrites(x)]
    write_jsonl(sft_rows, out / "sft.jsonl")
    sft = train(_load_recipe("shapes-rewriter-sft.yaml", [
        f"model.pretrained={base_dir}", f"data.source={out / 'sft.jsonl'}", f"train.output_dir={out / 'sft'}",
        "train.overwrite=true",
        f"train.max_steps={cfg.sft_steps}", f"train.seed={cfg.seed}", *cfg.overrides])) / "final"

    # 3. pairs from images scored against the original captions
    rows, pair_summary = build_pairs(PromptRewriter.from_pretrained(sft), pipe, train_prompts, cfg.pairs,
                                     rewards=rewards)
    write_jsonl(rows, out / "pairs.jsonl")
    if not rows:
        raise RuntimeError("no training pairs: every candidate of every caption scored the same")
    return sft, rows, pair_summary


def swapped_pairs(rows: list[dict]) -> list[dict]:
    """The control's pairs: each row's ``chosen`` and ``rejected`` exchanged."""
    return [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]


def train_dpo(cfg: ShapesRewriterConfig, sft: Path, pairs: Path, out: Path) -> Path:
    """Stage 4: DPO from the SFT model on the pair file ``pairs``; returns its ``final/``."""
    from diffalign.trainers.registry import run_recipe as train

    return train(_load_recipe("shapes-rewriter-dpo.yaml", [
        f"model.pretrained={sft}", f"data.source={pairs}", f"train.output_dir={out}", "train.overwrite=true",
        f"train.max_steps={cfg.dpo_steps}", f"train.seed={cfg.seed}", *cfg.overrides])) / "final"


def run_shapes_rewriter(cfg: ShapesRewriterConfig) -> dict:
    """Every stage of the module docstring; returns (and writes) ``results.json``."""
    from diffalign.shapes.demo import load_base_pipeline
    from diffalign.shapes.evaluate import evaluate
    from diffalign.shapes.grammar import prompt_set
    from diffalign.text.data import write_jsonl
    from diffalign.text.guidance import render_rewrites
    from diffalign.text.pairs import build_pairs
    from diffalign.text.rewriter import PromptRewriter

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.time()
    out = Path(cfg.out)
    heldout = list(dict.fromkeys(p.text for p in prompt_set("heldout", cfg.heldout_per_task, seed=cfg.seed + 1)))
    pipe = load_base_pipeline()
    rewards = pair_rewards(cfg)
    sft, rows, pair_summary = train_sft_and_pairs(cfg, out, pipe, rewards)
    held_cfg = PairConfig(**{**asdict(cfg.pairs), "seed": cfg.pairs.seed + 7})
    held_rows, held_summary = build_pairs(PromptRewriter.from_pretrained(sft), pipe, heldout, held_cfg,
                                          rewards=rewards)
    write_jsonl(held_rows, out / "pairs-heldout.jsonl")

    # 4. DPO from the SFT model
    dpo = train_dpo(cfg, sft, out / "pairs.jsonl", out / "dpo")

    # 5b. held-out pairs: preference of the DPO model over the SFT model's
    results: dict = {"train_captions": pair_summary["prompts"], "heldout_captions": len(heldout),
                     "pairs": pair_summary, "heldout_pairs": held_summary}
    # 5a. the training pairs: what DPO optimises (its margin must rise over the SFT model's)
    t_sft, t_dpo = pair_margins(sft, rows), pair_margins(dpo, rows)
    results["train_pair_margin"] = {"sft": float(t_sft.mean()), "dpo": float(t_dpo.mean())}
    if held_rows:
        m_sft, m_dpo = pair_margins(sft, held_rows), pair_margins(dpo, held_rows)
        results["heldout_pair_accuracy"] = {"sft": float((m_sft > 0).float().mean()),
                                            "dpo": float((m_dpo > 0).float().mean()),
                                            "dpo_above_sft": float((m_dpo > m_sft).float().mean())}
        results["heldout_pair_margin"] = {"sft": float(m_sft.mean()), "dpo": float(m_dpo.mean())}

    # 5c. images of held-out captions: unrewritten vs SFT and DPO rewrites (greedy), same seeds
    seeds = [1234 + j for j in range(cfg.eval_seeds)]
    flat = [x for x in heldout for _ in seeds]
    flat_seeds = seeds * len(heldout)
    greedy = RewriteConfig(do_sample=False, max_new_tokens=cfg.pairs.sampling.max_new_tokens)
    scores, examples = {}, {}
    for name, model_dir in (("original", None), ("sft", sft), ("dpo", dpo)):
        if model_dir is None:
            texts = heldout
        else:
            rw = PromptRewriter.from_pretrained(model_dir)
            texts = [r[0] for r in rw.rewrite(heldout, config=greedy)]
        examples[name] = dict(zip(heldout[:6], texts[:6]))
        images = render_rewrites(pipe, flat, [t for t in texts for _ in seeds], flat_seeds,
                                 num_inference_steps=cfg.pairs.num_inference_steps,
                                 guidance_scale=cfg.pairs.guidance_scale)
        fr = [evaluate(im, x).fraction for im, x in zip(images, flat)]
        ok = [evaluate(im, x).correct for im, x in zip(images, flat)]
        scores[name] = {"claims_held": sum(fr) / len(fr), "geneval_correct": sum(ok) / len(ok),
                        "unchanged_prompts": sum(t == x for t, x in zip(texts, heldout)) / len(heldout)}
    results["heldout_images"] = scores
    results["examples"] = examples
    results["seconds"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


class _TokOnly:
    """Just enough of a ``CausalLM`` for :meth:`PromptRewriter.training_prompt` (formatting only)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
