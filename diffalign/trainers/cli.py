"""`diffalign train RECIPE.yaml [--section.key=value ...] [--resume latest] [--dry-run] [--help]`."""

from __future__ import annotations

import argparse

ACCEPTS_OVERRIDES = True  # the dispatcher collects --section.key=value into args.overrides
OWN_HELP = True  # --help lists the recipe's fields (with the recipe given), so the parser adds no -h of its own


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", nargs="?", help="recipe YAML or a bundled recipe's name (see pipelines/); "
                                                  "'-' starts from defaults")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint folder (same as --train.resume=...)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier run in train.output_dir (same as --train.overwrite=true)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also load pickled (.bin) model weights (same as --model.allow_pickle=true); "
                             "by default only safetensors load, since unpickling a file can run code")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve the recipe, check its model and data paths, print the plan; train nothing")
    parser.add_argument("-h", "--help", action="store_true",
                        help="this help; with a recipe, every field of it with its type, value, default and doc")


def run(args: argparse.Namespace) -> int:
    from diffalign.errors import UsageError

    if args.help and args.recipe is None:
        _parser().print_help()
        print("\nGive a recipe (`diffalign train shapes-mapo --help`) to list its fields.")
        return 0
    if args.recipe is None:
        raise UsageError("a recipe is required (a YAML file, a bundled recipe's name, or '-' for the defaults)")
    from diffalign.trainers.config import describe_recipe
    from diffalign.trainers.registry import load_recipe, run_recipe

    overrides = list(getattr(args, "overrides", []))
    if args.resume:
        overrides.append(f"train.resume={args.resume}")
    if args.overwrite:
        overrides.append("train.overwrite=true")
    if args.allow_pickle:
        overrides.append("model.allow_pickle=true")
    recipe = load_recipe(None if args.recipe == "-" else args.recipe, overrides)
    if args.help:
        _parser().print_usage()
        print(f"\nFields of {args.recipe} (override any as --section.field=value):\n")
        print(describe_recipe(recipe))
        return 0
    if args.dry_run:
        from diffalign.trainers.registry import plan

        print(plan(recipe))
        return 0
    out = run_recipe(recipe)
    print(f"done: {out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign train", add_help=False,
                                     description="train a model from a recipe (YAML) with --section.key=value overrides")
    add_arguments(parser)
    return parser
