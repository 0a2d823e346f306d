"""``diffalign eval [RECIPE.yaml] [--section.key=value ...] [flags]``: generate, score, compare, report.

    diffalign eval pipelines/eval-shapes.yaml --prompts.limit=3
    diffalign eval --model stabilityai/stable-diffusion-xl-base-1.0 --compare-lora runs/sdxl-dpo/final \\
        --prompts partiprompts --rewards pickscore,hpsv2.1 --images-per-prompt 1 --output-dir runs/eval-parti

Flags are shorthands for recipe fields (``--steps`` is ``--generation.num_inference_steps``) and win
over the recipe and its overrides. ``--prompts`` takes a set name (``geneval``, ``partiprompts``,
``t2i-compbench``, ``drawbench``, ``hpdv2``, ``pickapic-test``, ``shapes``, ...), ``NAME:PATH`` for a
local copy of a set's file(s), or a ``.txt``/``.jsonl`` file of your own prompts. Outputs go to
``--output-dir`` (see :mod:`diffalign.eval.runner`); a stopped run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffalign.eval.prompts import prompts_fields

if TYPE_CHECKING:
    from diffalign.eval.config import EvalConfig

ACCEPTS_OVERRIDES = True  # the dispatcher collects --section.key=value into args.overrides

# flag -> (section, key)
FLAGS: dict[str, tuple[str, str]] = {
    "model": ("model", "pretrained"), "lora": ("model", "lora"), "finetuned": ("model", "finetuned"),
    "images": ("model", "images"), "compare_model": ("compare", "pretrained"), "compare_lora": ("compare", "lora"),
    "compare_finetuned": ("compare", "finetuned"), "compare_images": ("compare", "images"),
    "limit": ("prompts", "limit"), "images_per_prompt": ("generation", "images_per_prompt"),
    "steps": ("generation", "num_inference_steps"), "cfg": ("generation", "guidance_scale"),
    "seed": ("generation", "seed"), "batch_size": ("generation", "batch_size"), "device": ("generation", "device"),
    "detector": ("scoring", "geneval_detector"), "output_dir": ("output", "dir"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The recipe argument and the flags (recipe fields also come as ``--section.key=value``)."""
    parser.add_argument("recipe", nargs="?", default=None, help="eval recipe YAML (pipelines/eval-*.yaml); optional")
    g = parser.add_argument_group("models")
    g.add_argument("--model", help="hub id, diffusers folder or bundled:NAME of the model to evaluate")
    g.add_argument("--lora", help="a LoRA for --model (diffusers format: a run's final/ folder, file or hub id)")
    g.add_argument("--finetuned", help="a fine-tuned denoiser folder (unet/ or transformer/) for --model")
    g.add_argument("--images", help="score this folder of images (GenEval layout) instead of generating")
    g.add_argument("--compare-model", help="a second model on the same prompts and seeds (default: --model); the "
                   "report gives its difference and win rate over --model")
    g.add_argument("--compare-lora", help="a LoRA for the second model")
    g.add_argument("--compare-finetuned", help="a fine-tuned denoiser folder for the second model")
    g.add_argument("--compare-images", help="a folder of the second model's images (GenEval layout)")
    g.add_argument("--allow-pickle", action="store_true", default=None,
                   help="also load pickled (.bin/.pt) model, LoRA and reward weights (model.allow_pickle, "
                        "compare.allow_pickle and scoring.allow_pickle); by default only safetensors load")
    g = parser.add_argument_group("prompts and sampling")
    g.add_argument("--prompts", help="NAME, NAME:PATH (local copy) or a .txt/.jsonl file of prompts")
    g.add_argument("--limit", type=int, help="at most this many prompts per category")
    g.add_argument("--images-per-prompt", type=int)
    g.add_argument("--steps", type=int, help="sampler steps")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    g.add_argument("--seed", type=int, help="base seed (image j of prompt i: seed + 10000*i + j)")
    g.add_argument("--batch-size", type=int, help="images per pipeline call")
    g.add_argument("--device", help="auto (default), cpu, cuda, ...")
    g = parser.add_argument_group("scoring and output")
    g.add_argument("--rewards", help="reward names, comma-separated (see `diffalign score --reward`)")
    g.add_argument("--detector", help="GenEval detector: auto, none, shapes, transformers:<hub id or folder>")
    g.add_argument("--output-dir", help="run folder (images, results.json, report.html)")
    g = parser.add_argument_group("prompt rewriter")
    g.add_argument("--rewriter", help="a prompt rewriter (causal LM hub id, folder, or a `diffalign rewrite train` "
                                      "run's final/): --model samples the rewritten prompts, scored against the "
                                      "original ones, and is compared with the original prompts (or --compare-*)")
    g.add_argument("--rewriter-guidance", choices=["rewrite", "original-centered"], default="rewrite",
                   help="sample with the rewrite alone, or Parrot-style guidance centred on the original prompt")
    g.add_argument("--rewriter-original-weight", type=float, default=0.5,
                   help="original-centered: the share of the guidance scale given to the original prompt")


def flag_fields(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The recipe fields the flags set: ``{section: {key: value}}``."""
    out: dict[str, dict[str, Any]] = {}
    for flag, (section, key) in FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    if getattr(args, "prompts", None):
        out.setdefault("prompts", {}).update(prompts_fields(args.prompts))
    if getattr(args, "allow_pickle", None):
        for section in ("model", "compare", "scoring"):
            out.setdefault(section, {})["allow_pickle"] = True
    if getattr(args, "rewards", None) is not None:
        out.setdefault("scoring", {})["rewards"] = [r.strip() for r in args.rewards.split(",") if r.strip()]
    return out


def build_config(args: argparse.Namespace) -> EvalConfig:
    """The :class:`~diffalign.eval.config.EvalConfig` of a command line: recipe, overrides, then flags."""
    import yaml

    from diffalign.eval.config import eval_config_from_dict
    from diffalign.recipes import apply_overrides, resolve_recipe

    raw: dict[str, Any] = {}
    if args.recipe:
        path = resolve_recipe(args.recipe)  # a file, or a bundled recipe's name (eval-shapes)
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"eval recipe {path} must be a YAML mapping of sections")
    apply_overrides(raw, list(getattr(args, "overrides", []) or []))
    for section, values in flag_fields(args).items():
        node = raw.setdefault(section, {})
        if node is None:
            node = raw[section] = {}
        node.update(values)
    return eval_config_from_dict(raw)


def format_summary(results: dict) -> str:
    """The text table ``diffalign eval`` prints: one row per metric, GenEval tasks, where the files are."""
    from diffalign.eval.eval_report import metric_label, small_sample_warnings

    models = results["models"]
    cmp = results.get("comparison")
    ps = results["prompt_set"]
    s = models["model"]["generation"].get("settings", {})
    lines = [f"prompt set {ps['name']}: {ps['n_prompts']} prompts x {ps['images_per_prompt']} images"
             + (f" (limit {ps['limit']} per category)" if ps.get("limit") else "")]
    if s:
        lines.append(f"sampling: {s.get('scheduler')}, {s.get('num_inference_steps')} steps, guidance "
                     f"{s.get('guidance_scale')}, {s.get('height')}x{s.get('width')}, seed {s.get('base_seed')}")
    for role, m in models.items():
        lines.append(f"{role}: {m['label']}")
    if results.get("geneval") and not results["geneval"]["official"]:
        lines.append(f"GenEval detector: {results['geneval']['detector']}: not comparable with published GenEval "
                     "numbers")
    lines += [f"note: {n}" for n in results.get("notes", [])]
    lines += [f"warning: {w}" for w in small_sample_warnings(results)]
    width = max(len(metric_label(n, results)) for n in results["metrics"]) + 2 if results["metrics"] else 10
    head = f"{'metric':<{width}}{'model':>10}"
    if cmp:
        head += f"{'compare':>10}   {'difference [95% CI]':<28}{'win rate [95% CI]'}"
    lines += ["", head]
    for n in results["metrics"]:
        row = f"{metric_label(n, results):<{width}}{models['model']['summary']['metrics'][n]['mean']:>10.3f}"
        if cmp:
            c = cmp["metrics"][n]
            diff = f"{c['mean_diff']:+.3f} [{c['diff_ci95'][0]:+.3f}, {c['diff_ci95'][1]:+.3f}]"
            rate = f"{c['win_rate']:.3f} [{c['win_rate_ci95'][0]:.3f}, {c['win_rate_ci95'][1]:.3f}]"
            row += f"{models['compare']['summary']['metrics'][n]['mean']:>10.3f}   {diff:<28}{rate}"
        lines.append(row)
    ge = {role: m["geneval"] for role, m in models.items() if m.get("geneval")}
    if ge:
        lines += ["", f"{'GenEval task':<{width}}" + "".join(f"{role:>10}" for role in ge)]
        for t in ge["model"]["tasks"]:
            lines.append(f"{t:<{width}}" + "".join(f"{g['tasks'][t]:>10.3f}" for g in ge.values()))
        lines.append(f"{'overall':<{width}}" + "".join(f"{g['overall']:>10.3f}" for g in ge.values()))
    return "\n".join(lines)


def check_prompt_flags(args: argparse.Namespace, cfg: EvalConfig) -> None:
    """``--prompts`` / ``--limit`` choose the prompts to *generate*; when every model is a folder of
    images (``--images``, ``--compare-images``) nothing is generated and each image's prompt is its
    folder's ``metadata.jsonl`` line, so the flags would be ignored: a
    :class:`~diffalign.errors.UsageError` rather than a silently different evaluation."""
    from diffalign.errors import UsageError

    given = [f"--{f}" for f in ("prompts", "limit") if getattr(args, f, None) is not None]
    compare = cfg.compare_spec()
    if given and cfg.model.images and (compare is None or compare.images):
        raise UsageError(f"{' and '.join(given)} cannot be used with --images: nothing is generated, and every "
                         "image is scored with the prompt of its folder's NNNNN/metadata.jsonl; drop "
                         f"{' and '.join(given)}, or generate with --model instead of --images")


def run(args: argparse.Namespace) -> int:
    """Run the evaluation, print its summary; 2 on bad input."""
    from diffalign.eval.runner import run_eval

    try:
        cfg = build_config(args)
        check_prompt_flags(args, cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "rewriter", None):
        from diffalign.text.eval import with_rewriter

        cfg = with_rewriter(cfg, args.rewriter, guidance=args.rewriter_guidance,
                            original_weight=args.rewriter_original_weight)
    results = run_eval(cfg)
    out = Path(cfg.output.dir)
    print()
    print(format_summary(results))
    print(f"\nwrote {out / 'results.json'} and {out / 'report.html'} in {results['seconds'] / 60:.1f} min")
    return 0
