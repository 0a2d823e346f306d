"""`diffalign data`: inspect preference data, convert JSONL pairs to Pick-a-Pic parquet."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from diffalign.data.pairs import DataStats


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
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


def run(args: argparse.Namespace) -> int:
    try:
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
