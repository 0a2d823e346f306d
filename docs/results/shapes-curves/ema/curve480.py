"""Held-out ShapesEval of every checkpoint of a `diffalign shapes curve` run on 480 images (80 held-out
prompts a task, image i seeded i), for the trained weights (`trainable.safetensors`) or the LoRA the
checkpoint hands out (the EMA when the run had one), with the paired CI of each against base.

    python docs/results/shapes-curves/ema/curve480.py RUN_DIR {trained,handed-out} OUT.json
"""
import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffalign.eval.compare import paired_comparison
from diffalign.shapes.curve import heldout_scores

torch.set_num_threads(2)
run, which, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
base_model, per_task, sampling = "bundled:shapes-sd3-base", 80, {"num_inference_steps": 10, "guidance_scale": 1.0}
_, base, base_eval = heldout_scores(base_model, None, per_task, **sampling)
rows = [{"step": 0, **base_eval}]
print(json.dumps(rows[-1]), flush=True)
for ckpt in sorted((run / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
    with tempfile.TemporaryDirectory() as tmp:
        lora = ckpt
        if which == "trained":  # peft names -> the diffusers export's keys
            weights = load_file(str(ckpt / "trainable.safetensors"))
            save_file({"transformer." + k.replace(".default", ""): v.contiguous() for k, v in weights.items()},
                      str(Path(tmp) / "pytorch_lora_weights.safetensors"))
            lora = tmp
        _, correct, ev = heldout_scores(base_model, lora, per_task, **sampling)
    d = paired_comparison(correct, base, groups=list(range(len(base))))
    rows.append({"step": int(ckpt.name.split("-")[1]), **ev, "vs_base": d["mean_diff"], "vs_base_ci95": d["diff_ci95"]})
    print(json.dumps(rows[-1]), flush=True)
out.write_text(json.dumps({"run": run.name, "weights": which, "per_task": per_task, "sampling": sampling,
                           "rows": rows}, indent=2))
