"""Two CPU processes (torchrun, gloo DDP) follow the same loss curve as one process with twice the
gradient accumulation: same examples, same noise, same averaged gradients."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_two_processes_match_one_with_double_accumulation(tiny_models, pair_parquet, tmp_path):
    common = ["train", "-", f"--model.pretrained={tiny_models['sd']}", f"--data.source={pair_parquet}",
              "--data.resolution=32", "--train.batch_size=2", "--train.max_steps=4", "--train.learning_rate=1e-3",
              "--train.checkpointing_steps=0", "--model.lora_rank=4"]
    # ACCELERATE_USE_CPU: what `accelerate launch --cpu` sets; torchrun starts the two gloo processes
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "diffalign.cli", *common, f"--train.output_dir={one}",
                    "--train.gradient_accumulation_steps=2"], check=True, env=env)
    two = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                    "-m", "diffalign.cli", *common, f"--train.output_dir={two}",
                    "--train.gradient_accumulation_steps=1"], check=True, env=env)

    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(one)) == 4
    assert losses(two) == pytest.approx(losses(one), rel=1e-4, abs=1e-5)
    assert losses(one)[-1] != pytest.approx(losses(one)[0], abs=1e-6)  # it trained
