#!/usr/bin/env python
"""One FiFA variant on the Shapes world: filter the demo's oracle-labelled pairs, train
``pipelines/shapes-diffusion-dpo.yaml`` (300 steps, seed 0) on the kept pairs, compare with base on the
held-out set of ``tests/shapes/efficacy_helpers.py`` (noise-free oracle, 95% CI) and print one JSON line.

    python scripts/shapes_fifa_variant.py --margin signed --gamma 0 --budget 0.2 --out runs/fifa-signed-g0

``tests/shapes/test_efficacy_fifa.py`` measures the paper's variant (|margin|, γ = 1) against all pairs and
a random fifth; this runs the others (docs/methods/fifa.md lists what they gave). ~6 min on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "shapes"))  # the efficacy protocol's helpers


def main() -> None:
    from efficacy_helpers import HeldoutWorld, oracle_pairs, train_and_compare

    from diffalign.data.fifa import fifa_filter, parse_budget
    from diffalign.data.pickapic import write_pickapic_parquet
    from diffalign.rewards import load_reward

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--margin", choices=["abs", "signed"], default="abs")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--budget", default="0.2")
    p.add_argument("--out", required=True, help="a folder for the data, the run and the base images")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    world = HeldoutWorld(out)
    all_pairs = out / "all.parquet"
    write_pickapic_parquet(oracle_pairs(world.candidates, flip=False), all_pairs)
    kept = out / "fifa.parquet"
    stats = fifa_filter(all_pairs, kept, budget=parse_budget(args.budget), reward=load_reward("shapes-clip"),
                        k=args.k, margin=args.margin, gamma=args.gamma)
    cmp, _ = train_and_compare(world, out / "train", "shapes-diffusion-dpo.yaml", [], lambda p: shutil.copy(kept, p))
    print(json.dumps({"margin": args.margin, "gamma": args.gamma, "budget": args.budget, "stats": stats.as_dict(),
                      "over_base": [cmp["oracle_win_rate"]["aligned_over_base"], *cmp["oracle_win_rate"]["ci95"]],
                      "shapes_eval": cmp["shapes_eval"]["aligned"]["overall"],
                      "shapes_eval_base": cmp["shapes_eval"]["base"]["overall"]}))


if __name__ == "__main__":
    main()
