"""`diffalign data`: inspect preference data, convert JSONL pairs to Pick-a-Pic parquet, label images
with reward models into pairs or ranked lists (:mod:`diffalign.data.label`), keep FiFA's most informative
pairs under a budget (``fifa``, :mod:`diffalign.data.fifa`), embed each user's preference for PPD
(``user-embeddings``, :mod:`diffalign.data.users`), make DenseDPO's structural video pairs
(``video-pairs``, :mod:`diffalign.data.video`), rate prompts for FiFA's quality term (``rate-prompts``,
:mod:`diffalign.data.prompt_quality`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffalign.data.pairs import DataStats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    sub.add_parser("encode", help="pre-encode a recipe's data (VAE latents, text embeddings) into its latent cache "
                                  "(diffalign data encode RECIPE --help)")
    p = sub.add_parser("inspect", help="count rows, kept pairs, ties and bad images; label histogram")
    p.add_argument("path", help="parquet/tar file, directory or glob (Pick-a-Pic), a .jsonl file, or a hub id")
    p.add_argument("--format", choices=["auto", "pickapic", "jsonl", "feedback"], default="auto")
    p.add_argument("--split", default="train", help="hub split (hub ids only)")
    p.add_argument("--limit", type=int, default=None, help="stop after this many kept examples")
    p.add_argument("--image-root", default=None,
                   help="JSONL image paths are relative to this (default: the file's folder)")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    c = sub.add_parser("convert", help="JSONL pairs {prompt, chosen, rejected} -> Pick-a-Pic parquet")
    c.add_argument("input", help="JSONL file of pairs")
    c.add_argument("output", help="parquet file to write (atomically)")
    c.add_argument("--image-root", default=None)
    c.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    lab = sub.add_parser("label", help="score N images per prompt with rewards -> Pick-a-Pic pairs or ranked lists")
    lab.add_argument("images", help="GenEval-layout folder (NNNNN/samples/*.png + NNNNN/metadata.jsonl), a flat "
                     "folder of images (with --prompts), or a parquet file")
    lab.add_argument("--prompts", default=None, help="flat folder: .csv (file_name, prompt), .json mapping, or .txt")
    lab.add_argument("--reward", required=True, help="reward name(s), comma-separated; scores are normalised per "
                     "reward and averaged")
    lab.add_argument("--out", required=True, help="pairs: a .parquet file; ranked lists: .jsonl or .parquet")
    lab.add_argument("--format", dest="output", choices=["pairs", "ranked"], default="pairs")
    lab.add_argument("--pairs", choices=["best-worst", "all"], default="best-worst",
                     help="one pair per prompt (best vs worst) or every pair of its images")
    lab.add_argument("--min-margin", type=float, default=0.0,
                     help="drop pairs (ranked: lists) whose combined-score margin is below this")
    lab.add_argument("--normalize", choices=["dataset", "card", "none"], default="dataset",
                     help="per-reward normalisation before averaging: z-score over all images, the card's "
                     "mean/std, or none")
    lab.add_argument("--combine-weight", action="append", default=[], metavar="NAME=W",
                     help="weight of one reward in the average (default 1); repeatable")
    lab.add_argument("--reward-weights", action="append", default=[], metavar="NAME=PATH",
                     help="local weights (file, folder or hub id) for one reward; repeatable")
    lab.add_argument("--batch-size", type=int, default=16)
    lab.add_argument("--device", default="cpu")
    ff = sub.add_parser("fifa", help="FiFA: keep the pairs of largest proxy-reward margin, prompt quality and prompt "
                        "diversity under a budget (diffalign.data.fifa)")
    ff.add_argument("input", help="Pick-a-Pic parquet file, folder or glob (quoted)")
    ff.add_argument("--split", default="train", help="a folder in the Hub's layout: the files of this split")
    ff.add_argument("output", help="parquet file to write (atomically): the kept rows, all columns")
    ff.add_argument("--budget", required=True, help="a fraction (0.2 or 20%%) of the untied pairs, or a count (5000)")
    ff.add_argument("--reward", default=None, help="proxy reward scoring both images of each pair (default: the "
                    "rows' score_0/score_1 columns, e.g. from 'data label')")
    ff.add_argument("--reward-weights", default=None, help="local weights (file, folder or hub id) for --reward")
    ff.add_argument("--text-encoder", default=None, help="reward whose text tower embeds the prompts for the "
                    "diversity term (default: --reward)")
    ff.add_argument("--quality", default=None, help="cached prompt ratings: JSON {prompt: rating} or JSONL "
                    "{prompt, quality} (default: no quality term)")
    ff.add_argument("--alpha", type=float, default=1.0, help="weight of the quality term")
    ff.add_argument("--gamma", type=float, default=1.0, help="weight of the diversity term (0: margin and quality only)")
    ff.add_argument("--k", type=int, default=5, help="k of the k-NN entropy estimate")
    ff.add_argument("--margin", choices=["abs", "signed"], default="abs",
                    help="|r_w - r_l| (the paper) or r_w - r_l (drops pairs the proxy thinks mislabelled)")
    ff.add_argument("--batch-size", type=int, default=16)
    ff.add_argument("--device", default="cpu", help="where the reward scores and the k-NN distances are computed")
    ff.add_argument("--json", action="store_true", help="print the counts as JSON")
    rp = sub.add_parser("rate-prompts", help="FiFA's quality term: rate each prompt with a causal LM judge -> JSON "
                        "{prompt: rating} (diffalign.data.prompt_quality)")
    rp.add_argument("input", help="Pick-a-Pic parquet file, folder or glob (its captions), or a .txt of prompts")
    rp.add_argument("output", help="JSON file to write (atomically), for 'data fifa --quality'")
    rp.add_argument("--model", required=True, help="causal LM: hub id or local folder (safetensors; no remote code)")
    rp.add_argument("--batch-size", type=int, default=8)
    rp.add_argument("--device", default="cpu")
    ue = sub.add_parser("user-embeddings", help="PPD: embed each user's preference from their first pairs with a "
                        "frozen CLIP-type reward (diffalign.data.users)")
    ue.add_argument("input", help="Pick-a-Pic parquet file, folder or glob with a user_id column")
    ue.add_argument("output", help="safetensors file to write (atomically)")
    ue.add_argument("--encoder", required=True, help="a CLIP-type reward whose image features embed the pairs "
                    "(pickscore; shapes-clip on Shapes)")
    ue.add_argument("--examples", type=int, default=4, help="pairs per user (the paper: 4)")
    ue.add_argument("--split", default="train")
    ue.add_argument("--device", default="cpu")
    vp = sub.add_parser("video-pairs", help="DenseDPO structural pairs: partly noise each clip, denoise it twice "
                        "with different seeds (diffalign.data.video)")
    vp.add_argument("clips", help='JSONL of {"prompt", "video"} (video: .npy [T, H, W, 3], frame folder or video file)')
    vp.add_argument("--model", required=True, help="text-to-video model: hub id or local diffusers folder (Wan)")
    vp.add_argument("--out", required=True, help="folder for clips/*.npy and pairs.jsonl")
    vp.add_argument("--strength", type=float, default=0.6, help="noise level eta in (0, 1]: the share of the "
                    "sampling schedule re-run (lower = pairs closer to the clip and to each other)")
    vp.add_argument("--steps", type=int, default=30, help="sampling steps of the full schedule")
    vp.add_argument("--guidance-scale", type=float, default=5.0)
    vp.add_argument("--seed", type=int, default=0, help="row i uses seeds seed+2i and seed+2i+1")
    vp.add_argument("--segment-frames", type=int, required=True, help="segment length in pixel frames "
                    "(DenseDPO: about 1 s; a multiple of the VAE's temporal compression)")
    vp.add_argument("--reward", default=None, help="label each segment by this reward's mean per-frame score "
                    "(default: leave segment_labels null for annotators)")
    vp.add_argument("--tie-margin", type=float, default=0.0, help="reward difference at or below which a segment "
                    "is a tie")
    vp.add_argument("--device", default="cpu")
    vp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


def _format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    return "jsonl" if path.endswith((".jsonl", ".json")) else "pickapic"


def inspect(path: str, fmt: str = "auto", *, split: str = "train", limit: int | None = None,
            image_root: str | None = None) -> DataStats:
    """Read a data source through its reader (ties counted, not dropped) and return the counts."""
    stats = DataStats()
    fmt = _format(path, fmt)
    if fmt == "pickapic":
        from diffalign.data.pickapic import read_pickapic

        items = read_pickapic(path, split=split, drop_ties=False, stats=stats)
    elif fmt == "jsonl":
        from diffalign.data.jsonl import read_jsonl_pairs

        items = read_jsonl_pairs(path, image_root=image_root, stats=stats)
    else:
        from diffalign.data.kto import read_feedback

        items = read_feedback(path, image_root=image_root, stats=stats)
    for n, _ in enumerate(items, start=1):
        if limit is not None and n >= limit:
            break
    if fmt == "pickapic":  # ties were kept to be counted: report them as a trainer would see them
        stats.ties_dropped = int(stats.labels.get(0.5, 0))
        stats.kept -= stats.ties_dropped
    return stats


def convert(src: str | Path, dst: str | Path, *, image_root: str | None = None, strict: bool = False) -> DataStats:
    """JSONL pairs to Pick-a-Pic parquet (chosen as ``jpg_0``, ``label_0 = 1``), image bytes kept as they are."""
    from diffalign.data.jsonl import iter_raw_pairs
    from diffalign.data.pickapic import write_pickapic_parquet

    stats = DataStats()
    rows = ({"caption": r.prompt, "jpg_0": r.chosen, "jpg_1": r.rejected, "label_0": 1.0,
             "caption_1": r.prompt_rejected, "weight": r.weight}
            for r in iter_raw_pairs(src, image_root=image_root, strict=strict, stats=stats))
    write_pickapic_parquet(rows, dst, optional_columns=("caption_1", "weight"))
    return stats


def _pairs_of(options: list[str], flag: str) -> dict[str, str]:
    out = {}
    for opt in options:
        name, sep, value = opt.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{flag} expects NAME=VALUE, got {opt!r}")
        out[name] = value
    return out


def label_command(args: argparse.Namespace):
    """``diffalign data label``: load the rewards, then :func:`diffalign.data.label.label`."""
    from diffalign.data.label import label as run_label
    from diffalign.rewards.registry import is_reward, list_rewards, load_reward

    names = [n.strip() for n in args.reward.split(",") if n.strip()]
    unknown = [n for n in names if not is_reward(n) and not Path(n).is_dir()]
    if not names or unknown:
        raise ValueError(f"unknown reward(s) {unknown}; registered: {', '.join(list_rewards())}")
    local = _pairs_of(args.reward_weights, "--reward-weights")
    try:
        mix = {k: float(v) for k, v in _pairs_of(args.combine_weight, "--combine-weight").items()}
    except ValueError as e:
        raise ValueError(f"--combine-weight: {e}") from None
    stray = sorted(set(mix) - set(names))
    if stray:
        raise ValueError(f"--combine-weight names reward(s) {stray} not given in --reward")
    rewards = {}
    for n in names:
        kw = {"batch_size": args.batch_size, **({"weights": local[n]} if n in local else {})}
        rewards[n] = load_reward(n, **kw).to(args.device)
    return run_label(args.images, rewards, args.out, prompts=args.prompts, output=args.output, pairs=args.pairs,
                     min_margin=args.min_margin, weights=mix, normalize=args.normalize, batch_size=args.batch_size)


def fifa_command(args: argparse.Namespace):
    """``diffalign data fifa``: load the proxy reward (and text encoder), then :func:`diffalign.data.fifa.fifa_filter`."""
    from diffalign.data.fifa import fifa_filter, parse_budget, read_quality
    from diffalign.rewards.registry import is_reward, list_rewards, load_reward

    budget = parse_budget(args.budget)
    for flag, name in (("--reward", args.reward), ("--text-encoder", args.text_encoder)):
        if name is not None and not is_reward(name) and not Path(name).is_dir():
            raise ValueError(f"{flag}: unknown reward {name!r}; registered: {', '.join(list_rewards())}")
    if args.reward_weights and not args.reward:
        raise ValueError("--reward-weights needs --reward")
    reward = None
    if args.reward:
        kw = {"batch_size": args.batch_size, **({"weights": args.reward_weights} if args.reward_weights else {})}
        reward = load_reward(args.reward, **kw).to(args.device)
    encoder = None
    if args.gamma != 0:
        source = reward if args.text_encoder in (None, args.reward) else load_reward(args.text_encoder).to(args.device)
        encoder = getattr(source, "encode_text", None)
        if encoder is None:
            which = args.text_encoder or args.reward
            raise ValueError(f"the diversity term embeds prompts with a reward's text tower: {which!r} has none; "
                             "name one with --text-encoder (a CLIP-type reward), or pass --gamma 0"
                             if which else "the diversity term needs --text-encoder (or --reward); or pass --gamma 0")
    quality = read_quality(args.quality) if args.quality else None
    return fifa_filter(args.input, args.output, budget=budget, reward=reward, text_encoder=encoder, quality=quality,
                       alpha=args.alpha, gamma=args.gamma, k=args.k, margin=args.margin, batch_size=args.batch_size,
                       split=args.split, device=args.device)


def video_pairs_command(args: argparse.Namespace) -> Path:
    """``diffalign data video-pairs``: :func:`diffalign.data.video.make_structural_pairs` from the command line."""
    import torch

    from diffalign.data.video import make_structural_pairs
    from diffalign.models import load_backbone

    backbone = load_backbone(args.model, torch_dtype=getattr(torch, args.dtype)).to(args.device)
    reward = None
    if args.reward:
        from diffalign.rewards import load_reward

        reward = load_reward(args.reward).to(args.device)
    return make_structural_pairs(backbone, args.clips, args.out, strength=args.strength, seed=args.seed,
                                 num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                                 segment_frames=args.segment_frames, reward=reward, tie_margin=args.tie_margin)


def run(args: argparse.Namespace) -> int:
    try:
        if args.data_command == "video-pairs":
            print(f"wrote {video_pairs_command(args)}")
            return 0
        if args.data_command == "label":
            stats = label_command(args)
            print(f"wrote {args.out}: {stats}")
            return 0
        if args.data_command == "rate-prompts":
            from diffalign.data.prompt_quality import load_judge, rate_prompts, read_prompts, write_ratings

            model, tokenizer = load_judge(args.model, args.device)
            ratings = rate_prompts(read_prompts(args.input), model, tokenizer, batch_size=args.batch_size)
            write_ratings(ratings, args.output)
            print(f"wrote {args.output}: {len(ratings)} prompts rated")
            return 0
        if args.data_command == "user-embeddings":
            from diffalign.data.users import build_user_embeddings
            from diffalign.rewards.registry import load_reward

            users = build_user_embeddings(args.input, args.output, load_reward(args.encoder).to(args.device),
                                          per_user=args.examples, split=args.split, encoder_name=args.encoder)
            print(f"wrote {args.output}: {len(users.ids)} users, embeddings {list(users.embeddings.shape)}")
            return 0
        if args.data_command == "fifa":
            stats = fifa_command(args)
            print(json.dumps(stats.as_dict(), indent=2) if args.json else f"wrote {args.output}: {stats}")
            return 0
        if args.data_command == "inspect":
            stats = inspect(args.path, args.format, split=args.split, limit=args.limit, image_root=args.image_root)
            if args.json:
                print(json.dumps(stats.as_dict(), indent=2))
            else:
                print(f"{args.path}: {stats}")
                for label, n in sorted(stats.labels.items(), key=lambda kv: str(kv[0])):
                    print(f"  label {label}: {n}")
                for row in stats.bad_rows:
                    print(f"  bad image: {row}")
            return 0
        stats = convert(args.input, args.output, image_root=args.image_root, strict=args.strict)
        print(f"wrote {args.output}: {stats}")
        return 0
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
        print(f"diffalign data: error: {e}", file=sys.stderr)
        return 1
