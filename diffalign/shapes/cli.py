"""`diffalign shapes pretrain | pretrain-flow | pretrain-reward | pretrain-pickscore | render | candidates | label |
curve | efficacy`: the Shapes world's own tools."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tool", choices=["pretrain", "pretrain-flow", "pretrain-reward", "pretrain-pickscore", "render",
                                         "candidates", "label", "curve", "efficacy"],
                        help="pretrain: the bundled base model; pretrain-flow: the bundled flow-matching (SD3) "
                             "base; pretrain-reward: the bundled learned reward; pretrain-pickscore: that reward "
                             "fine-tuned on the oracle's preference pairs (the bundled shapes-pickscore); "
                             "render: ground-truth images for prompts of the grammar; candidates: base-model "
                             "samples per training prompt with their oracle utilities (the efficacy tests' data); "
                             "label: oracle-labelled training data from candidates (Pick-a-Pic pairs or KTO "
                             "feedback), for any shapes-*.yaml recipe; curve: held-out ShapesEval against "
                             "training minutes of an on-line recipe; efficacy: every method at several training "
                             "seeds on labels and flipped labels, against base (the README's efficacy table)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the tool's own arguments (--help for them)")


def run(args: argparse.Namespace) -> int:
    if args.tool == "pretrain":
        from diffalign.shapes.pretrain import main
    elif args.tool == "pretrain-flow":
        from diffalign.shapes.pretrain_flow import main
    elif args.tool == "curve":
        from diffalign.shapes.curve import main
    elif args.tool == "efficacy":
        from diffalign.shapes.efficacy import main
    elif args.tool == "pretrain-reward":
        from diffalign.shapes.pretrain_reward import main
    elif args.tool == "pretrain-pickscore":
        from diffalign.shapes.pretrain_pickscore import main
    elif args.tool == "candidates":
        main = candidates_main
    elif args.tool == "label":
        main = label_main
    else:
        main = render_main
    return main(args.args)


def render_main(argv: list[str] | None = None) -> int:
    """Render ``--n-per-task`` ground-truth scenes per task of a split into a folder (PNG + prompts.txt, and
    references.json ``{prompt: [files]}``: Adv-GRPO's ``method.reference_images``)."""
    import json
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
    references: dict[str, list[str]] = {}
    for i, prompt in enumerate(prompts):
        references.setdefault(prompt.text, []).append(f"{i:05d}.png")
    (out / "references.json").write_text(json.dumps(references, indent=0))
    print(f"wrote {len(prompts)} images, prompts.txt and references.json to {out}")
    return 0


def candidates_main(argv: list[str] | None = None) -> int:
    """Sample candidates from the bundled base model as the demo does and save each prompt's best and worst."""
    import random

    from diffalign.shapes.demo import DemoConfig, load_base_pipeline, sample_candidates
    from diffalign.shapes.grammar import sample_prompt

    d = DemoConfig
    p = argparse.ArgumentParser(prog="diffalign shapes candidates")
    p.add_argument("--out", required=True, help="parquet file to write")
    p.add_argument("--train-prompts", type=int, default=d.train_prompts)
    p.add_argument("--images-per-prompt", type=int, default=d.images_per_prompt)
    p.add_argument("--sample-steps", type=int, default=d.sample_steps)
    p.add_argument("--keep-all", action="store_true", help="keep every candidate, not only the best and worst")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    prompts = [sample_prompt(rng, split="train") for _ in range(a.train_prompts)]
    cands = sample_candidates(load_base_pipeline(), prompts, images_per_prompt=a.images_per_prompt, seed=a.seed,
                              num_inference_steps=a.sample_steps, guidance_scale=d.guidance_scale)
    path = (cands if a.keep_all else cands.extremes()).save(a.out)
    print(f"wrote {len(prompts)} prompts' candidates to {path}")
    return 0


def label_main(argv: list[str] | None = None) -> int:
    """Label candidates with the oracle as the demo and the efficacy tests do: Pick-a-Pic pairs (each prompt's
    best and worst candidate) or per-image KTO feedback (liked above the median utility)."""
    from pathlib import Path

    from diffalign.shapes.demo import (
        BUNDLED_CANDIDATES,
        Candidates,
        preference_rows,
        write_feedback_data,
        write_preference_data,
    )
    from diffalign.shapes.oracle import Oracle

    p = argparse.ArgumentParser(prog="diffalign shapes label")
    p.add_argument("--out", required=True, help="folder to write train.parquet (pairs) or feedback.jsonl into")
    p.add_argument("--candidates", default="bundled",
                   help="a parquet from `diffalign shapes candidates`, or 'bundled' (the demo's own samples)")
    p.add_argument("--format", choices=["pickapic", "feedback"], default="pickapic")
    p.add_argument("--noise", type=float, default=0.1, help="the oracle's label noise (the demo's 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seeds the oracle's noise")
    p.add_argument("--flip", action="store_true", help="reverse every label (the control run)")
    a = p.parse_args(argv)
    cands = Candidates.load(BUNDLED_CANDIDATES if a.candidates == "bundled" else Path(a.candidates))
    oracle, out = Oracle(noise=a.noise, seed=a.seed), Path(a.out)
    if a.format == "feedback":
        path = write_feedback_data(cands, oracle, out, flip=a.flip)
        print(f"wrote per-image feedback on {sum(map(len, cands.images))} images to {path} "
              f"(train with --data.source={path} --data.format=feedback)")
    else:
        path = out / "train.parquet"
        counts = write_preference_data(preference_rows(cands, oracle, flip=a.flip), path)
        print(f"wrote {len(cands.prompts)} oracle-labelled pairs to {path} (labels {counts}; "
              f"train with --data.source={path})")
    return 0
