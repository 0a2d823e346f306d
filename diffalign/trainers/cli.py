"""`diffalign train RECIPE.yaml [--section.key=value ...] [--resume latest]`."""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True  # the dispatcher collects --section.key=value into args.overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see pipelines/); '-' starts from defaults")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (same as --train.resume=...)")


def run(args: argparse.Namespace) -> int:
    from diffalign.trainers.registry import load_recipe, run_recipe

    overrides = list(getattr(args, "overrides", []))
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    recipe = load_recipe(None if args.recipe == "-" else args.recipe, overrides)
    out = run_recipe(recipe)
    print(f"done: {out}")
    return 0
