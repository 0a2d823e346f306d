#!/usr/bin/env python
"""The data path at scale: time to the first optimizer step, peak RSS and steady pairs/s against the set's size.

    python scripts/make_pickapic_set.py --pairs 100000 --out sets/100k      # and 1k, 10k, 1M ...
    python scripts/data_scale_bench.py --set 1k=sets/1k --set 100k=sets/100k --workers 0,2 --json scale.json

For each set and worker count it runs ``diffalign train`` (Diffusion-DPO, LoRA r8, B pairs a step, 16 px training crops of the 64-px images,
fp32, no latent cache: every step decodes, VAE-encodes and text-encodes its pairs) on a tiny SD1.x pipeline
(:func:`diffalign.testing.make_tiny_sd`) in a fresh process, and reports:

- ``first_step_s``: from launching the process to the first line of its metrics.jsonl (start-up, model load,
  opening the data, the first step);
- ``peak_rss_mb``: the largest peak resident set of the training process or any of its DataLoader workers
  (``ru_maxrss`` of ``wait4``);
- ``pairs_per_s``: B over the median step time of the steps after the first five (each step's ``seconds``
  in metrics.jsonl, waiting for its batch included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = """model:
  pretrained: {pipe}
  lora_rank: 8
data:
  source: {data}
  resolution: {resolution}
  random_flip: true
  cache_dir: ""
  num_workers: {workers}
method:
  name: diffusion-dpo
  beta: 5000
train:
  output_dir: {out}
  max_steps: {steps}
  batch_size: {batch}
  learning_rate: 1.0e-5
  lr_scheduler: constant
  checkpointing_steps: 0
  mixed_precision: "no"
"""


def measure(pipe: Path, data: Path, work: Path, *, workers: int, steps: int, batch: int, threads: int,
            resolution: int) -> dict:
    """One training run in a fresh process; its start-up time, peak RSS and steady pairs/s."""
    out = work / f"run-{time.time_ns()}"
    recipe = out.with_suffix(".yaml")
    recipe.write_text(RECIPE.format(pipe=pipe, data=data, out=out, steps=steps, batch=batch, workers=workers,
                                     resolution=resolution))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    log = open(out.with_suffix(".log"), "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "diffalign.cli", "train", str(recipe)], env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    metrics, first = out / "metrics.jsonl", None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # rusage: the child and the workers it waited for
        if pid:
            break
        if first is None and metrics.exists() and metrics.stat().st_size:
            first = time.perf_counter() - t0
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode:
        raise RuntimeError(f"training failed (rc {proc.returncode}); log: {out.with_suffix('.log')}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    step_s = statistics.median(r["seconds"] for r in rows[5:])
    return {"first_step_s": first, "peak_rss_mb": usage.ru_maxrss / 1024, "pairs_per_s": batch / step_s,
            "rows_read": rows[-1].get("data/rows_read")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", required=True, help="NAME=FOLDER of a set (make_pickapic_set.py)")
    ap.add_argument("--workers", default="0,2", help="comma-separated data.num_workers values")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resolution", type=int, default=16,
                    help="training size (16: the tiny pipeline's VAE gives 8x8 latents, so the data path shows)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from diffalign.testing import make_tiny_sd

    work = Path(tempfile.mkdtemp(prefix="data-scale-"))
    pipe = make_tiny_sd(work / "pipeline")
    results = []
    for spec in a.set:
        name, _, folder = spec.partition("=")
        for workers in (int(w) for w in a.workers.split(",")):
            for rep in range(a.repeats):
                r = measure(pipe, Path(folder), work, workers=workers, steps=a.steps, batch=a.batch,
                            threads=a.threads, resolution=a.resolution)
                r.update(set=name, workers=workers, repeat=rep)
                results.append(r)
                print(f"{name:>6} workers={workers} first_step_s={r['first_step_s']:.2f} "
                      f"peak_rss_mb={r['peak_rss_mb']:.0f} pairs_per_s={r['pairs_per_s']:.1f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps({"batch": a.batch, "steps": a.steps, "threads": a.threads,
                                            "results": results}, indent=1))


if __name__ == "__main__":
    main()
