"""``diffalign score``: score a folder (or parquet file) of images with one or more rewards.

    diffalign score --reward pickscore,hpsv2.1 --images outputs/ --prompts prompts.txt --out scores.csv

Inputs:
  --images DIR      image files (.png .jpg .jpeg .webp .bmp), taken in sorted file-name order;
  --images X.parquet  one image per row in an ``image`` column (bytes, or a ``{"bytes": ...}``
                    struct as written by ``datasets``), or Pick-a-Pic rows with ``jpg_0``/``jpg_1``
                    (two images per row, named ``<row>_0`` / ``<row>_1``); prompts may come from a
                    ``prompt`` or ``caption`` column.
  --prompts FILE    .txt: one prompt per line, matched to the images in sorted order (same count);
                    .json: ``{"file name": "prompt", ...}`` (file name with or without extension)
                    or a list in image order; .csv: columns ``file_name`` (or ``image``) and ``prompt``.
Output: one row per image: ``image, prompt, <one column per reward>``, as CSV (default, or stdout
when --out is not given) or JSON (a list of objects) when --out ends in .json. The folder of --out must
exist (checked before any scoring). An image that does not decode is skipped, and the skips are counted
and named on stderr; the other images are scored.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

from diffalign.rewards.scoring import (
    InputError,
    list_images,
    parquet_images,
    read_prompts,
    score_images,
    unreadable_images,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true", help="list the registered rewards (name, backbone, what "
                        "the score means, from each reward's card) and exit")
    parser.add_argument("--reward", help="reward name(s), comma-separated (see --list), or a "
                        "served one: remote:http://HOST:PORT (`diffalign reward serve NAME`)")
    parser.add_argument("--images", help="folder of images, or a parquet file")
    parser.add_argument("--prompts", help="prompts: .txt (one per line, sorted image order), .json or .csv mapping")
    parser.add_argument("--out", help="scores.csv or scores.json (default: CSV on stdout)")
    parser.add_argument("--mode", default="exact", choices=["exact", "differentiable"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reward-weights", action="append", default=[], metavar="NAME=PATH",
                        help="local weights (file, folder or hub id) for one reward; repeatable")
    parser.add_argument("--benchmark-scale", action="store_true", help="HPSv2: report 100 * cosine")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also load pickled (.pt/.pth/.bin) reward checkpoints; by default only safetensors load, "
                             "since unpickling a file can run code")


def write_rows(rows: list[dict], out: str | None) -> None:
    """Rows as JSON (``out`` ends in .json) or CSV; the file is written whole (temp file, then rename)."""
    if out and out.endswith(".json"):
        text = json.dumps(rows, indent=1)
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    if not out:
        sys.stdout.write(text)
        return
    from diffalign.data.files import atomic_write

    atomic_write(out, lambda tmp: tmp.write_text(text))


def reward_list() -> str:
    """One line a registered reward: its name, then the start of its card's score and backbone (or "no
    card"; ``get_card`` gives the whole card)."""
    from diffalign.rewards.registry import get_card, list_rewards

    def short(text: str, n: int) -> str:
        return text if len(text) <= n else text[:n - 1].rstrip() + "…"

    lines = []
    for name in list_rewards():
        card = get_card(name)
        about = f"{short(card.score, 70)} [{short(card.backbone, 40)}]" if card else "no card"
        lines.append(f"{name:<24} {about}")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from diffalign.rewards.registry import is_reward, list_rewards, load_reward

    if args.list:
        sys.stdout.write(reward_list())
        return 0
    if not args.reward:
        print("error: --reward is required (--list names them)", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.reward.split(",") if n.strip()]
    unknown = [n for n in names if not is_reward(n) and not Path(n).is_dir()]
    if unknown:
        print(f"error: unknown reward(s) {unknown}; registered: {', '.join(list_rewards())}", file=sys.stderr)
        return 2
    if not args.images:
        print("error: --images is required", file=sys.stderr)
        return 2
    weights = dict(w.split("=", 1) for w in args.reward_weights)
    try:
        if args.out:
            check_out(Path(args.out))
        path = Path(args.images)
        if path.is_dir():
            files = list_images(path)
            image_names, sources, parquet_prompts = [f.name for f in files], files, None
        elif path.suffix == ".parquet" and path.is_file():
            image_names, sources, parquet_prompts = parquet_images(path)
        else:
            raise InputError(f"{path}: --images must be a folder or a .parquet file")
        if args.prompts:
            prompts = read_prompts(Path(args.prompts), image_names)
        elif parquet_prompts is not None:
            prompts = parquet_prompts
        else:
            raise InputError("--prompts is required (the images carry no prompts)")
        skipped = unreadable_images(sources)
        if len(skipped) == len(sources):
            raise InputError(f"{path}: none of the {len(sources)} images decodes (first: {image_names[0]}: "
                             f"{skipped[0][1]})")
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if skipped:
        print(f"skipped {len(skipped)} of {len(sources)} images that do not decode: "
              + "; ".join(f"{image_names[i]} ({why})" for i, why in skipped[:5])
              + (f"; and {len(skipped) - 5} more" if len(skipped) > 5 else ""), file=sys.stderr)
        drop = {i for i, _ in skipped}
        keep = [i for i in range(len(sources)) if i not in drop]
        image_names, sources, prompts = ([xs[i] for i in keep] for xs in (image_names, sources, prompts))
    rewards = {}
    for n in names:
        kw = {"mode": args.mode, "batch_size": args.batch_size, "allow_pickle": args.allow_pickle}
        if n in weights:
            kw["weights"] = weights[n]
        if n.lower().startswith("hpsv2") and args.benchmark_scale:
            kw["benchmark_scale"] = True
        rewards[n] = load_reward(n, **kw).to(args.device)
    scores = score_images(rewards, sources, prompts, args.batch_size)
    rows = [{"image": name, "prompt": prompt, **{n: scores[n][i] for n in names}}
            for i, (name, prompt) in enumerate(zip(image_names, prompts))]
    write_rows(rows, args.out)
    if args.out:
        print(f"wrote {len(rows)} rows to {args.out}"
              + (f" ({len(skipped)} unreadable image(s) skipped)" if skipped else ""), file=sys.stderr)
    return 0


def check_out(out: Path) -> None:
    """``--out`` can be written: its folder exists and it is not a folder itself (before any scoring)."""
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; give a file name (scores.csv or scores.json)")
    if not out.parent.is_dir():
        raise InputError(f"--out {out}: the folder {out.parent} does not exist; create it first (nothing was "
                         "scored)")
