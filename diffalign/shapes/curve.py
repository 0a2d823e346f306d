"""Held-out ShapesEval against training minutes: the Shapes miniature of the on-line RL headline curves.

    diffalign shapes curve RECIPE [KEY=VALUE ...] --eval-every 4 [--per-task 8] [--out DIR]

Trains ``RECIPE`` (with its dotted overrides) once, checkpointing every ``--eval-every`` steps, then
samples the held-out prompt combinations (``prompt_set("heldout", per_task)``, fixed seeds) with the base
model and with each checkpoint's LoRA loaded in the plain diffusers pipeline, and scores them with
ShapesEval (GenEval's rules: the share of correct images per task, ``overall`` their mean). Training
minutes are the run's own clock: the sum of each step's rollout and update seconds in ``metrics.jsonl``
(evaluation excluded). Writes ``DIR/curve.json``: rows ``step``, ``minutes``, ``overall``, per task and, for
each checkpoint, ``vs_base`` (its paired difference of per-image correctness against base) with
``vs_base_ci95`` (bootstrap over prompts); ``last_vs_base`` is the last checkpoint's full comparison.
A held-out sample of 60 images (``--per-task 10``) moves by about ±0.15 between neighbouring checkpoints;
``--per-task 80`` (480 images) reads a checkpoint to about ±0.05.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffalign.shapes.model import DEFAULT_SAMPLING


def training_minutes(metrics_path: Path) -> dict[int, float]:
    """``{step: minutes of training up to and including it}`` from ``metrics.jsonl`` (its ``seconds``
    and ``rollout_seconds`` fields)."""
    total, out = 0.0, {}
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "step" not in row:
            continue
        total += float(row.get("seconds", 0.0)) + float(row.get("rollout_seconds", 0.0))
        out[int(row["step"])] = total / 60
    return out


def heldout_scores(pretrained: str, lora: str | Path | None, per_task: int, *, num_inference_steps: int,
                   guidance_scale: float, seed: int = 0) -> tuple[list[str], list[float], dict[str, float]]:
    """Sample ``prompt_set("heldout", per_task, seed)`` (image ``i`` seeded ``i``) with ``pretrained``
    (+ ``lora``) through its plain diffusers pipeline; returns (tasks, per-image correctness, ShapesEval)."""
    from diffusers import DiffusionPipeline

    from diffalign.eval.generate import generate
    from diffalign.models.loading import resolve_pretrained
    from diffalign.shapes.evaluate import evaluate, shapes_eval
    from diffalign.shapes.grammar import prompt_set

    path = resolve_pretrained(pretrained)
    kwargs = {"text_encoder_3": None, "tokenizer_3": None} if _is_sd3_without_t5(path) else {}
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    prompts = prompt_set("heldout", n_per_task=per_task, seed=seed)
    images = generate(pipe, [p.text for p in prompts], list(range(len(prompts))),
                      num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      height=DEFAULT_SAMPLING["height"], width=DEFAULT_SAMPLING["width"])
    correct = [float(evaluate(im, p).correct) for im, p in zip(images, prompts)]
    return [p.task for p in prompts], correct, shapes_eval(images, prompts)


def _is_sd3_without_t5(path: str) -> bool:
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return False
    entry = json.loads(index.read_text()).get("text_encoder_3")
    return isinstance(entry, list) and entry[0] is None


def curve(recipe_path: str, overrides: list[str], *, eval_every: int, per_task: int, out: Path,
          num_inference_steps: int | None = None, guidance_scale: float | None = None) -> dict:
    """Train, evaluate base and every checkpoint, write and return ``curve.json``'s content."""
    from diffalign.eval.compare import paired_comparison
    from diffalign.trainers.registry import load_recipe, run_recipe

    recipe = load_recipe(recipe_path, [*overrides, f"train.output_dir={out / 'run'}",
                                       f"train.checkpointing_steps={eval_every}"])
    method = recipe.method
    steps = num_inference_steps or getattr(method, "num_steps", DEFAULT_SAMPLING["num_inference_steps"])
    guidance = guidance_scale if guidance_scale is not None else getattr(method, "guidance_scale",
                                                                         DEFAULT_SAMPLING["guidance_scale"])
    run_dir = run_recipe(recipe)
    minutes = training_minutes(run_dir / "metrics.jsonl")
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    sampling = {"num_inference_steps": steps, "guidance_scale": guidance}
    tasks, base_correct, base_eval = heldout_scores(recipe.model.pretrained, None, per_task, **sampling)
    rows = [{"step": 0, "minutes": 0.0, **base_eval}]
    last_correct = base_correct
    for ckpt in checkpoints:
        step = int(ckpt.name.split("-")[1])
        _, last_correct, ev = heldout_scores(recipe.model.pretrained, ckpt, per_task, **sampling)
        d = paired_comparison(last_correct, base_correct, groups=list(range(len(base_correct))))
        rows.append({"step": step, "minutes": round(minutes.get(step, float("nan")), 3), **ev,
                     "vs_base": d["mean_diff"], "vs_base_ci95": list(d["diff_ci95"])})
        print(json.dumps(rows[-1]), flush=True)
    result = {"recipe": recipe_path, "overrides": overrides, "eval_every": eval_every, "per_task": per_task,
              "sampling": sampling, "rows": rows,
              "last_vs_base": paired_comparison(last_correct, base_correct,
                                                groups=list(range(len(base_correct))))}
    (out / "curve.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="diffalign shapes curve", description=__doc__.split("\n\n")[0])
    p.add_argument("recipe", help="a recipe file or bundled name (e.g. shapes-flow-grpo)")
    p.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides of the recipe")
    p.add_argument("--eval-every", type=int, required=True, help="checkpoint (and evaluate) every N steps")
    p.add_argument("--per-task", type=int, default=8, help="held-out prompts per task (one image each)")
    p.add_argument("--num-inference-steps", type=int, default=None, help="default: the method's num_steps")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: the method's guidance_scale")
    p.add_argument("--out", type=Path, required=True, help="a new folder for the run and curve.json")
    args = p.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        p.error(f"--out {args.out} exists and is not empty; choose a new folder")
    args.out.mkdir(parents=True, exist_ok=True)
    result = curve(args.recipe, args.overrides, eval_every=args.eval_every, per_task=args.per_task, out=args.out,
                   num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    d = result["last_vs_base"]
    print(f"held-out ShapesEval overall {result['rows'][0]['overall']:.3f} -> {result['rows'][-1]['overall']:.3f} "
          f"(paired diff of correctness {d['mean_diff']:+.3f}, 95% CI [{d['diff_ci95'][0]:+.3f}, "
          f"{d['diff_ci95'][1]:+.3f}]); {args.out / 'curve.json'}")
    return 0
