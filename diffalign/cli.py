"""The `diffalign` command: `train | score | reward serve | eval | data | demo | bench | shapes`.

Each subcommand lives in the module that owns its work and exposes two functions:
``add_arguments(parser)`` and ``run(args) -> int``. The modules are imported only when
their subcommand is used, so `diffalign score` does not import the trainers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("diffalign.trainers.cli", "train a model from a recipe (YAML) with --key.sub=value overrides"),
    "score": ("diffalign.rewards.cli", "score images with one or more reward models"),
    "reward": ("diffalign.rewards.serve", "reward service: `reward serve NAME` hosts a reward over HTTP (remote:URL)"),
    "eval": ("diffalign.eval.cli", "benchmark a model (or two, paired): generate, score, results.json, report.html"),
    "data": ("diffalign.data.cli", "build, label and inspect preference data"),
    "rewrite": ("diffalign.text.cli", "prompt rewriter: generate rewrites, train text methods, build pairs from images"),
    "demo": ("diffalign.shapes.demo", "the whole pipeline on the bundled Shapes world, offline, on a CPU"),
    "bench": ("diffalign.trainers.bench", "measure training throughput and peak memory"),
    "shapes": ("diffalign.shapes.cli", "Shapes world tools: pretrain the base model and reward, render, evaluate"),
}

# `diffalign data encode` needs the models and the recipe (the trainers' layer), which diffalign.data may not import
ROUTES: dict[tuple[str, tuple[str, ...]], tuple[str, str]] = {("data", ("encode",)): ("diffalign.trainers.encode",
                                  "pre-encode a recipe's data (VAE latents, text embeddings) into its latent cache")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffalign", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A :class:`~diffalign.errors.UsageError` (a bad recipe, option or value) is
    one line on stderr and exit status 2; ``--debug`` anywhere (or ``DIFFALIGN_DEBUG=1``) shows its
    traceback instead."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DIFFALIGN_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in SUBCOMMANDS:
        parser = build_parser()
        if argv and argv[0] not in {"-h", "--help"}:
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_text = SUBCOMMANDS[name]
    if (name, tuple(rest[:1])) in ROUTES:  # a subcommand owned by a module above its command's own
        module_name, help_text = ROUTES[name, tuple(rest[:1])]
        name, rest = f"{name} {rest[0]}", rest[1:]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"diffalign {name}", description=help_text,
                                     add_help=not getattr(module, "OWN_HELP", False))
    module.add_arguments(parser)
    if getattr(module, "ACCEPTS_OVERRIDES", False):
        # recipe commands: known options anywhere, everything else must be --section.key=value
        args, unknown = parser.parse_known_args(rest)
        bad = [u for u in unknown if not (u.startswith("--") and "=" in u and "." in u.split("=", 1)[0])]
        if bad:
            parser.error(f"unrecognised arguments {bad}; overrides look like --train.max_steps=100")
        args.overrides = [u.removeprefix("--") for u in unknown]
    else:
        args = parser.parse_args(rest)
    from diffalign.errors import UsageError

    try:
        return int(module.run(args) or 0)
    except UsageError as e:
        if debug:
            raise
        print(f"diffalign {name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
