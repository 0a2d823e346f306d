"""`diffalign shapes pretrain | pretrain-reward | render`: the Shapes world's own tools."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tool", choices=["pretrain", "pretrain-reward", "render"],
                        help="pretrain: the bundled base model; pretrain-reward: the bundled learned reward; "
                             "render: ground-truth images for prompts of the grammar")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the tool's own arguments (--help for them)")


def run(args: argparse.Namespace) -> int:
    if args.tool == "pretrain":
        from diffalign.shapes.pretrain import main
    elif args.tool == "pretrain-reward":
        from diffalign.shapes.pretrain_reward import main
    else:
        main = render_main
    return main(args.args)


def render_main(argv: list[str] | None = None) -> int:
    """Render ``--n-per-task`` ground-truth scenes per task of a split into a folder (PNG + prompts.txt)."""
    import random
    from pathlib import Path

    from diffalign.shapes.grammar import prompt_set, scene_for_prompt
    from diffalign.shapes.scene import render

    p = argparse.ArgumentParser(prog="diffalign shapes render")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="heldout", choices=["train", "heldout", "all"])
    p.add_argument("--n-per-task", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    prompts = prompt_set(a.split, a.n_per_task, seed=a.seed)
    for i, prompt in enumerate(prompts):
        render(scene_for_prompt(prompt, rng)).save(out / f"{i:05d}.png")
    (out / "prompts.txt").write_text("".join(p.text + "\n" for p in prompts))
    print(f"wrote {len(prompts)} images and prompts.txt to {out}")
    return 0
