"""`diffalign train RECIPE.yaml [--section.key=value ...] [--resume latest]`."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see pipelines/)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (same as --train.resume=...)")
    parser.add_argument("overrides", nargs=argparse.REMAINDER,
                        help="--section.key=value overrides, e.g. --train.max_steps=100 --method.beta=2500")


def run(args: argparse.Namespace) -> int:
    from diffalign.trainers.config import load_recipe
    from diffalign.trainers.loop import train

    overrides, resume, rest = [], args.resume, list(args.overrides)
    while rest:  # --resume may also come after the first override
        item = rest.pop(0)
        if item == "--resume":
            if not rest:
                raise SystemExit("--resume needs a value: 'latest' or a checkpoint folder")
            resume = rest.pop(0)
        elif item.startswith("--resume="):
            resume = item.split("=", 1)[1]
        else:
            overrides.append(item)
    if resume:
        overrides.append(f"train.resume={resume}")
    recipe = load_recipe(args.recipe, overrides)
    out = train(recipe)
    print(f"done: {out}")
    return 0
