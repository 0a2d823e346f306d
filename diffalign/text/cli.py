"""``diffalign rewrite``: the prompt rewriter and the text-side trainers.

    diffalign rewrite generate --model Qwen/Qwen2.5-0.5B-Instruct --prompt "a cat on a sofa"
    diffalign rewrite generate --model runs/rewriter-dpo/final --prompts geneval --out rewrites.jsonl
    diffalign rewrite train pipelines/text-rewriter-sft.yaml [--train.max_steps=100] [--resume latest]
    diffalign rewrite build-pairs --model runs/rewriter-sft/final --t2i stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --prompts prompts.txt --reward aesthetic=1 --reward clipscore=1 --out runs/rewriter-pairs.jsonl
    diffalign rewrite perturb --model Qwen/Qwen2.5-0.5B-Instruct --prompts captions.txt --out negatives.jsonl
    diffalign rewrite shapes --out runs/shapes-rewriter      # SFT + DPO end to end on the Shapes world

``train`` runs any text recipe (``text-sft``, ``text-dpo``, ``text-kto``, ``text-simpo``, ``text-orpo``) on
the shared loop, with ``--section.key=value`` overrides as ``diffalign train``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ACCEPTS_OVERRIDES = True  # `rewrite train` takes --section.key=value overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    def model_args(p, required=True):
        p.add_argument("--model", required=required, help="causal LM: hub id, folder, or a run's final/ (adapter)")
        p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, ...")
        p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None)
        p.add_argument("--allow-pickle", action="store_true",
                       help="also load pickled (.bin) weights; by default only safetensors load, since unpickling "
                            "a file can run code")

    def prompt_args(p):
        p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
        p.add_argument("--prompts", help="a prompt set name (geneval, partiprompts, drawbench, shapes, ...) or a "
                                         ".txt/.jsonl file of prompts")
        p.add_argument("--limit", type=int, help="at most this many prompts")

    g = sub.add_parser("generate", help="rewrite prompts in batch (JSONL out: prompt, rewrites)")
    model_args(g)
    prompt_args(g)
    g.add_argument("--num", type=int, default=1, help="rewrites per prompt")
    g.add_argument("--sample", action="store_true", help="sample (else greedy / beam search)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--max-new-tokens", type=int, default=77)
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", help="JSONL file (default: print)")

    t = sub.add_parser("train", help="train a text recipe (text-sft / dpo / kto / simpo / orpo) on the shared loop")
    t.add_argument("recipe", help="recipe YAML (pipelines/text-*.yaml)")
    t.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    t.add_argument("--allow-pickle", action="store_true",
                   help="also load pickled (.bin) model weights (same as --model.allow_pickle=true)")

    b = sub.add_parser("build-pairs", help="candidate rewrites -> images -> rewards -> TRL preference pairs")
    model_args(b)
    prompt_args(b)
    b.add_argument("--t2i", required=True, help="text-to-image pipeline: hub id, folder or bundled:shapes-sd-base")
    b.add_argument("--reward", action="append", default=[], metavar="NAME=WEIGHT",
                   help="reward and weight (repeatable), scored against the original prompt; default shapes-eval=1")
    b.add_argument("--normalize", choices=["none", "batch"], default=None,
                   help="put rewards on one scale before weighting (default: batch when several, else none)")
    b.add_argument("--num-candidates", type=int, default=4)
    b.add_argument("--no-original", action="store_true", help="do not add the unrewritten prompt as a candidate")
    b.add_argument("--images-per-candidate", type=int, default=2)
    b.add_argument("--pairing", choices=["best-worst", "all"], default="best-worst")
    b.add_argument("--min-margin", type=float, default=0.0)
    b.add_argument("--semantic-alpha", type=float, default=0.0, help="Sem-DPO weight strength (0 = off)")
    b.add_argument("--guidance", choices=["rewrite", "original-centered"], default="rewrite")
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--cfg", type=float, default=5.0)
    b.add_argument("--temperature", type=float, default=1.0)
    b.add_argument("--max-new-tokens", type=int, default=77)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--out", required=True, help="pairs JSONL")

    p = sub.add_parser("perturb", help="TPO negatives: minimally edited, mismatched captions (LLM, rule fallback)")
    model_args(p, required=False)
    prompt_args(p)
    p.add_argument("--principle", action="append", default=[], help="content, attribute, spatial, contextual")
    p.add_argument("--max-changed-words", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSONL (caption, perturbed, principle, source); default: print")

    s = sub.add_parser("shapes", help="SFT + DPO of a tiny rewriter on the Shapes world, evaluated on held-out prompts")
    s.add_argument("--out", default="runs/shapes-rewriter")
    for flag in ("--train-per-task", "--heldout-per-task", "--sft-steps", "--dpo-steps", "--num-candidates",
                 "--images-per-candidate", "--eval-seeds"):
        s.add_argument(flag, type=int, default=None, help="default: ShapesRewriterConfig's")
    s.add_argument("--steps", type=int, default=None, help="sampler steps of the base model (default 20)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=None)


def _device(name: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def _dtype(name):
    import torch

    return {None: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        from diffalign.eval.prompts import load_prompt_file, load_prompt_set

        spec = args.prompts
        items = load_prompt_file(spec) if spec.endswith((".txt", ".jsonl")) else load_prompt_set(spec)
        prompts += [item.text for item in items]
    if args.limit is not None:
        prompts = prompts[:args.limit]
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT or --prompts SET_OR_FILE")
    return prompts


def _emit(rows: list[dict], out: str | None) -> None:
    if out:
        from diffalign.text.data import write_jsonl

        write_jsonl(rows, out)
        print(f"wrote {len(rows)} rows to {out}")
    else:
        for row in rows:
            print(json.dumps(row, ensure_ascii=False))


def _rewards(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items or ["shapes-eval=1"]:
        name, _, weight = item.partition("=")
        try:
            out[name.strip()] = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"--reward {item!r}: the weight must be a number (NAME=WEIGHT)") from None
    return out


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from diffalign.text.rewriter import PromptRewriter, RewriteConfig

    overrides = list(getattr(args, "overrides", []) or [])
    if overrides and args.action != "train":
        raise ValueError(f"--section.key=value overrides are for `rewrite train`, not `rewrite {args.action}`")
    if args.action == "train":
        from diffalign.trainers.registry import load_recipe, run_recipe

        if args.resume:
            overrides.append(f"train.resume={args.resume}")
        if args.allow_pickle:
            overrides.append("model.allow_pickle=true")
        recipe = load_recipe(args.recipe, overrides)
        if recipe.method.kind != "text":
            raise ValueError(f"`rewrite train` trains text methods; {recipe.method.name!r} is a {recipe.method.kind} "
                             "method (use `diffalign train`)")
        print(f"done: {run_recipe(recipe)}")
        return 0
    if args.action == "shapes":
        import dataclasses

        from diffalign.text.shapes import ShapesRewriterConfig, run_shapes_rewriter

        def given(**fields):  # the flags set on the command line; the config's defaults for the rest
            return {k: v for k, v in fields.items() if v is not None}

        cfg = ShapesRewriterConfig(out=args.out, seed=args.seed, threads=args.threads, **given(
            train_per_task=args.train_per_task, heldout_per_task=args.heldout_per_task, sft_steps=args.sft_steps,
            dpo_steps=args.dpo_steps, eval_seeds=args.eval_seeds))
        cfg.pairs = dataclasses.replace(cfg.pairs, **given(
            num_candidates=args.num_candidates, images_per_candidate=args.images_per_candidate,
            num_inference_steps=args.steps))
        results = run_shapes_rewriter(cfg)
        print(format_shapes_results(results))
        print(f"wrote {Path(args.out) / 'results.json'}")
        return 0

    rewriter = PromptRewriter.from_pretrained(args.model, device=_device(args.device), torch_dtype=_dtype(args.dtype),
                                              allow_pickle=args.allow_pickle) if args.model else None
    prompts = _prompts(args)
    if args.action == "generate":
        cfg = RewriteConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                            top_p=args.top_p, num_beams=args.num_beams, batch_size=args.batch_size, seed=args.seed)
        out = rewriter.rewrite(prompts, num_return_sequences=args.num, config=cfg)
        _emit([{"prompt": p, "rewrites": r} for p, r in zip(prompts, out)], args.out)
        return 0
    if args.action == "build-pairs":
        from diffalign.eval.generate import load_eval_pipeline
        from diffalign.text.pairs import PairConfig, build_pairs

        rewards = _rewards(args.reward)
        normalize = args.normalize or ("batch" if len(rewards) > 1 else "none")
        cfg = PairConfig(num_candidates=args.num_candidates, include_original=not args.no_original,
                         images_per_candidate=args.images_per_candidate, seed=args.seed, rewards=rewards,
                         normalize=None if normalize == "none" else normalize, pairing=args.pairing,
                         min_margin=args.min_margin, semantic_alpha=args.semantic_alpha, guidance=args.guidance,
                         num_inference_steps=args.steps, guidance_scale=args.cfg,
                         sampling=RewriteConfig(do_sample=True, temperature=args.temperature,
                                                max_new_tokens=args.max_new_tokens, seed=args.seed))
        pipe = load_eval_pipeline(args.t2i, device=args.device, allow_pickle=args.allow_pickle)
        rows, summary = build_pairs(rewriter, pipe, prompts, cfg)
        _emit(rows, args.out)
        print(json.dumps(summary))
        return 0
    if args.action == "perturb":
        from diffalign.text.llm_perturb import (
            PRINCIPLES,
            LLMPerturber,
            rule_perturbation,
        )

        principles = args.principle or list(PRINCIPLES)
        if rewriter is None:  # rules only
            import random

            rng = random.Random(args.seed)
            rows = []
            for c in prompts:
                pr = rng.choice(principles)
                edited = rule_perturbation(c, rng, pr)
                rows.append({"caption": c, "perturbed": edited, "principle": pr, "source": "rule" if edited else None})
        else:
            results = LLMPerturber(rewriter, principles=principles,
                                   max_changed_words=args.max_changed_words).perturb(prompts, seed=args.seed)
            rows = [r.__dict__ for r in results]
        _emit(rows, args.out)
        return 0
    raise ValueError(f"unknown action {args.action!r}")


def format_shapes_results(r: dict) -> str:
    """The Shapes rewriter run as a short table (README's output)."""
    lines = [f"train captions {r['train_captions']}, pairs {r['pairs']['pairs']}; held-out captions "
             f"{r['heldout_captions']}, pairs {r['heldout_pairs']['pairs']}"]
    if "train_pair_margin" in r:
        t = r["train_pair_margin"]
        lines.append(f"training pairs: mean margin sft {t['sft']:+.2f} -> dpo {t['dpo']:+.2f}")
    if "heldout_pair_accuracy" in r:
        a, m = r["heldout_pair_accuracy"], r["heldout_pair_margin"]
        lines.append(f"held-out pairs: P(logp(chosen) > logp(rejected)) sft {a['sft']:.2f} -> dpo {a['dpo']:.2f}; "
                     f"mean margin sft {m['sft']:+.2f} -> dpo {m['dpo']:+.2f}; dpo above sft on {a['dpo_above_sft']:.0%}")
    lines.append(f"{'held-out images':<18}{'claims held':>12}{'GenEval correct':>17}{'prompt unchanged':>18}")
    for name, s in r["heldout_images"].items():
        lines.append(f"{name:<18}{s['claims_held']:>12.3f}{s['geneval_correct']:>17.3f}{s['unchanged_prompts']:>18.2f}")
    return "\n".join(lines)
