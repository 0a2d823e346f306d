"""Reading what a training run wrote (imported by name from any test folder)."""

import json
from pathlib import Path

# four Shapes-style prompts the tiny-model trainer tests sample and train on
PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow circle left of a red square"]


def read_metrics(run_dir) -> list[dict]:
    """The rows of ``run_dir/metrics.jsonl``, one dict per optimizer step."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
