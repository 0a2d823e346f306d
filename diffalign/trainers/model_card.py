"""``final/README.md``: the model card of a trained run, in the format the Hugging Face Hub shows (YAML
front matter with ``base_model``, ``library_name`` and ``tags``, then Markdown): the base model, the method
and its whole config, the data and its counts, the steps, the last metrics, and how to load it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml


def model_card(recipe, *, steps: int, last_metrics: dict | None, data_stats: dict | None, lora: bool,
               library: str = "diffusers") -> str:
    """The card's text for a run of ``recipe`` that ended at ``steps``."""
    m = recipe.method
    front = {"base_model": recipe.model.pretrained, "library_name": library,
             "tags": ["diffalign", m.name, "lora" if lora else "full-fine-tune",
                      "text-generation" if m.kind == "text" else "text-to-image"]}
    metrics = {k: v for k, v in (last_metrics or {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "seconds")}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {m.name} on {recipe.model.pretrained}", "",
             f"Trained with diffalign ({m.name}; kind: {m.kind}) for "
             f"{steps} optimizer steps, " + (f"LoRA rank {recipe.model.lora_rank}." if lora else "full fine-tune."),
             "", "## Method", "", "```yaml", yaml.safe_dump(m.to_dict(), sort_keys=False).strip(), "```", "",
             "## Data", "", f"Source: `{recipe.data.source}` (format {recipe.data.format})."]
    if data_stats:
        lines.append(f"Rows read {data_stats.get('rows')}, kept {data_stats.get('kept')}, ties dropped "
                     f"{data_stats.get('ties_dropped')}, skipped for bad images {data_stats.get('bad_images')}.")
    t = recipe.train
    lines += ["", "## Training", "",
              f"{steps} steps, batch {t.batch_size} x {t.gradient_accumulation_steps} accumulation per process, "
              f"learning rate {t.learning_rate:g} ({t.lr_scheduler}), mixed precision {t.mixed_precision}, seed "
              f"{t.seed}. The whole recipe is `config.yaml` of the run directory."]
    if getattr(t, "ema_decay", 0.0) > 0:
        lines += ["", f"The weights here are the exponential moving average of the trained weights (decay "
                      f"{t.ema_decay:g}, one update an optimizer step: `train.ema_decay`), not the last weights "
                      "themselves; those are each checkpoint's `trainable.safetensors`."]
    if metrics:
        lines += ["", "Last step's metrics:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" for k, v in metrics.items()]
    lines += ["", "## Use", ""]
    if m.kind == "text":
        lines += ["```python", "from peft import AutoPeftModelForCausalLM" if lora else
                  "from transformers import AutoModelForCausalLM",
                  ("model = AutoPeftModelForCausalLM.from_pretrained(\"final\")" if lora else
                   "model = AutoModelForCausalLM.from_pretrained(\"final\")"), "```"]
    elif lora:
        base = recipe.model.pretrained
        where = (["from diffalign.models import resolve_pretrained  # a model bundled with diffalign", "",
                  f"pipe = DiffusionPipeline.from_pretrained(resolve_pretrained({base!r}))"]
                 if base.startswith("bundled:") else ["", f"pipe = DiffusionPipeline.from_pretrained({base!r})"])
        lines += ["```python", "from diffusers import DiffusionPipeline", *where,
                  "pipe.load_lora_weights(\"final\")  # this folder", "```"]
    else:
        lines += ["The trained denoiser is saved as a component folder: load it with its class's "
                  "`from_pretrained(\"final\", subfolder=...)` and put it into the base pipeline."]
    return "\n".join(lines) + "\n"


def write_model_card(folder: Path, recipe, *, steps: int, metrics_path: Path, data_stats: dict | None,
                     lora: bool) -> Path:
    """Write ``folder/README.md`` (the last row of ``metrics_path`` gives the metrics)."""
    last = None
    if metrics_path.is_file():
        rows = [line for line in metrics_path.read_text().splitlines() if line.strip()]
        last = json.loads(rows[-1]) if rows else None
    path = Path(folder) / "README.md"
    path.write_text(model_card(recipe, steps=steps, last_metrics=last, data_stats=data_stats, lora=lora))
    return path


__all__ = ["model_card", "write_model_card"]
