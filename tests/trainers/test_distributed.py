"""Distributed runs through accelerate.

* DDP: two CPU processes (torchrun, gloo) follow the same loss curve as one process with twice the
  gradient accumulation: same examples, same noise, same averaged gradients.
* FSDP: end to end on 2 GPUs (accelerate runs no FSDP on CPU: the test says so and skips); on CPU,
  torch FSDP's gathered state dict saves what the unsharded model saves.
* DeepSpeed ZeRO-2/3 (where deepspeed is installed): one CPU process gives the plain run's LoRA.
* Units: DeepSpeed's config from the recipe, the warning when fewer processes run than were asked.
"""

import json
import os
import subprocess
import sys

import pytest
import torch


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


# ---------------------------------------------------------------- sharded runs: FSDP, DeepSpeed ZeRO

CPU_ENV = {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_CPU": "true"}


def _common(tiny_models, pair_parquet, steps=2):
    return ["train", "-", f"--model.pretrained={tiny_models['sd']}", f"--data.source={pair_parquet}",
            "--data.resolution=32", "--train.batch_size=2", f"--train.max_steps={steps}",
            "--train.learning_rate=1e-3", "--model.lora_rank=4"]


def _lora_file(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "pytorch_lora_weights.safetensors"))


def _lora(run_dir):
    return _lora_file(run_dir / "final")


def _assert_same_lora(got, want, rtol=1e-4, atol=1e-6):
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key].float(), want[key].float(), rtol=rtol, atol=atol, msg=key)
    assert any(v.abs().max() > 0 for k, v in want.items() if "lora_B" in k or "lora.up" in k)  # it trained


def _loads_in_plain_diffusers(tiny_sd, final):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(final))
    assert pipe.get_list_adapters()


def _accelerate_kind(env: dict) -> str:
    """The ``distributed_type`` accelerate picks in a 1-process torch.distributed setting with ``env``
    (a subprocess: accelerate's state lives once per process)."""
    code = "from accelerate import Accelerator; print(Accelerator().distributed_type)"
    dist_env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **dist_env, **env},
                         capture_output=True, text=True, check=False)
    lines = out.stdout.strip().splitlines()
    return lines[-1] if out.returncode == 0 and lines else f"an error ({out.stderr.strip().splitlines()[-1:]})"


FSDP_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_USE_ORIG_PARAMS": "true", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "BasicTransformerBlock",
            "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}


@pytest.mark.slow
def test_fsdp_two_processes_save_the_unsharded_lora(tiny_models, pair_parquet, tmp_path):
    """A 2-step LoRA Diffusion-DPO run under FSDP (2 processes) writes the same ``final/`` LoRA as the
    run without FSDP (1 process, 2× accumulation), and plain diffusers loads it. Runs on 2 GPUs, or on
    CPU processes where accelerate runs FSDP there."""
    device_env = {"OMP_NUM_THREADS": "1"} if torch.cuda.device_count() >= 2 else CPU_ENV
    kind = _accelerate_kind({**device_env, **FSDP_ENV})
    if kind != "DistributedType.FSDP":
        import accelerate

        pytest.skip(f"accelerate {accelerate.__version__} does not run FSDP on CPU processes: with "
                    f"ACCELERATE_USE_CPU=true and ACCELERATE_USE_FSDP=true its distributed_type is {kind} "
                    "(accelerate/state.py turns FSDP on for GPU/NPU/XPU-type processes only), and there are "
                    "fewer than 2 GPUs")
    common = _common(tiny_models, pair_parquet)
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "diffalign.cli", *common, f"--train.output_dir={one}",
                    "--train.gradient_accumulation_steps=2", "--train.checkpointing_steps=0"],
                   check=True, env={**os.environ, **device_env})
    fsdp = tmp_path / "fsdp"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
                    "-m", "diffalign.cli", *common, f"--train.output_dir={fsdp}",
                    "--train.gradient_accumulation_steps=1", "--train.checkpointing_steps=1"],
                   check=True, env={**os.environ, **device_env, **FSDP_ENV})
    _assert_same_lora(_lora(fsdp), _lora(one))
    assert (fsdp / "checkpoints" / "step-1" / "pytorch_lora_weights.safetensors").is_file()
    _loads_in_plain_diffusers(tiny_models["sd"], fsdp / "final")


@pytest.mark.slow
# ZeRO-3 sums its accumulated gradients in its own partitioned buffers: equal to float rounding, which
# Adam's first step (g / sqrt(g²)) magnifies for near-zero gradient entries; 1e-5 is 0.5% of lora_B's size
@pytest.mark.parametrize(("stage", "atol"), [(2, 1e-6), (3, 1e-5)])
def test_deepspeed_zero_saves_the_same_lora_as_a_plain_run(stage, atol, tiny_models, pair_parquet, tmp_path):
    """DeepSpeed ZeRO-2 / ZeRO-3 through accelerate: 2 steps of 2 accumulated micro-batches give the
    LoRA of the same run without DeepSpeed (the recipe's micro-batch, accumulation and clipping go
    into DeepSpeed's config; ZeRO-3 gathers the weights to save them). One process: on CPU accelerate
    counts a DeepSpeed run as one process whatever torchrun starts."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed")
    common = _common(tiny_models, pair_parquet) + ["--train.gradient_accumulation_steps=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    plain = tmp_path / "plain"
    subprocess.run([sys.executable, "-m", "diffalign.cli", *common, f"--train.output_dir={plain}",
                    "--train.checkpointing_steps=0"], check=True, env=env)
    ds = tmp_path / "ds"
    ds_env = {**env, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": str(stage),
              "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29521",
                    "-m", "diffalign.cli", *common, f"--train.output_dir={ds}", "--train.checkpointing_steps=1"],
                   check=True, env=ds_env)
    _assert_same_lora(_lora(ds), _lora(plain), atol=atol)
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (ds, plain)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    assert (ds / "checkpoints" / "step-1" / "pytorch_lora_weights.safetensors").is_file()
    _loads_in_plain_diffusers(tiny_models["sd"], ds / "final")


# ---------------------------------------------------------------- DeepSpeed config, launch warning (unit)


def test_deepspeed_plugin_config_gets_the_recipes_batch_accumulation_and_clipping():
    from accelerate.utils import DeepSpeedPlugin

    from diffalign.trainers.config import TrainConfig
    from diffalign.trainers.distributed import apply_deepspeed_settings, deepspeed_settings

    train = TrainConfig(batch_size=3, gradient_accumulation_steps=4, max_grad_norm=0.5)
    plugin = DeepSpeedPlugin(zero_stage=2)  # accelerate's defaults: every batch value "auto"
    config = apply_deepspeed_settings(plugin.deepspeed_config, deepspeed_settings(train, num_processes=2))
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 3 * 4 * 2
    assert config["gradient_clipping"] == 0.5
    assert plugin.get_value("train_micro_batch_size_per_gpu") == 3  # what accelerate.prepare reads

    # an explicit equal value is kept; a different one is an error naming the key
    apply_deepspeed_settings({"train_micro_batch_size_per_gpu": 3}, deepspeed_settings(train, 2))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu: 8 in the DeepSpeed config, 3 from"):
        apply_deepspeed_settings({"train_micro_batch_size_per_gpu": 8}, deepspeed_settings(train, 2))


def test_configure_deepspeed_leaves_other_runs_alone():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from diffalign.trainers.config import TrainConfig
    from diffalign.trainers.distributed import configure_deepspeed

    acc = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU, num_processes=2,
                          state=SimpleNamespace(deepspeed_plugin=None))
    configure_deepspeed(acc, TrainConfig())  # no DeepSpeed: nothing is read or written


def test_launch_warning_when_fewer_processes_run_than_were_asked():
    from diffalign.trainers.distributed import launch_warning

    # `accelerate launch --cpu --num_processes 2`: one process, with what accelerate's simple launcher sets
    env = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    message = launch_warning(env, num_processes=1)
    assert message is not None and "\n" not in message
    assert "accelerate launch --cpu" in message
    assert "ACCELERATE_USE_CPU=true torchrun --nproc_per_node=N -m diffalign.cli train" in message
    # torchrun on a machine without GPUs and without ACCELERATE_USE_CPU: each process runs alone
    message = launch_warning({"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": "29500"}, num_processes=1)
    assert "2 processes were launched" in message and "--nproc_per_node=2" in message
    # what runs as asked says nothing
    assert launch_warning({**env, "WORLD_SIZE": "2"}, num_processes=2) is None
    assert launch_warning({}, num_processes=1) is None
    assert launch_warning({"ACCELERATE_USE_CPU": "true"}, num_processes=1) is None
    assert launch_warning({"WORLD_SIZE": "1", "ACCELERATE_USE_CPU": "true", "MASTER_ADDR": "x", "MASTER_PORT": "1"},
                          num_processes=1) is None


def test_accelerate_launch_cpu_prints_the_warning(tiny_models, pair_parquet, tmp_path):
    """The warning comes out of a real run started the way ``accelerate launch --cpu --num_processes 2``
    starts it (its environment; one process)."""
    env = {**os.environ, **CPU_ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29535"}
    env.pop("WORLD_SIZE", None)
    out = subprocess.run([sys.executable, "-m", "diffalign.cli", *_common(tiny_models, pair_parquet, steps=1),
                          f"--train.output_dir={tmp_path / 'run'}", "--train.checkpointing_steps=0"],
                         env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if "accelerate launch --cpu" in line]
    assert len(lines) == 1 and "torchrun --nproc_per_node=N" in lines[0]


FSDP_WORKER = '''
import sys
from functools import partial

import torch
import torch.distributed as dist
from diffusers.models.attention import BasicTransformerBlock
from torch.distributed.fsdp import FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

from diffalign.models import load_backbone

model_dir, out_dir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
dist.init_process_group("gloo")
backbone = load_backbone(model_dir)
if mode == "lora":
    backbone.add_lora(rank=4)
else:
    backbone.enable_full_finetune()
with torch.no_grad():  # the same "trained" weights on both processes
    g = torch.Generator().manual_seed(0)
    for name, p in backbone.raw_denoiser.named_parameters():
        if p.requires_grad and ("lora_" in name or "attn1.to_q" in name):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
if dist.get_rank() == 0:
    backbone.save_trained(out_dir + "/unsharded")
# what accelerate's prepare does under FSDP1 with TRANSFORMER_BASED_WRAP and use_orig_params
backbone.denoiser = FSDP(backbone.raw_denoiser, use_orig_params=True, device_id=torch.device("cpu"),
                         auto_wrap_policy=partial(transformer_auto_wrap_policy,
                                                  transformer_layer_cls={BasicTransformerBlock}))
assert any("_fsdp_wrapped_module." in n for n, _ in backbone.raw_denoiser.named_parameters())
# what accelerator.get_state_dict does under FSDP1
with FSDP.state_dict_type(backbone.denoiser, StateDictType.FULL_STATE_DICT,
                          FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
    gathered = backbone.denoiser.state_dict()
if dist.get_rank() == 0:
    backbone.save_trained(out_dir + "/sharded", state_dict=gathered)
dist.barrier()
dist.destroy_process_group()
'''


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fsdp_gathered_state_dict_saves_the_unsharded_weights_on_cpu(mode, tiny_models, tmp_path):
    """torch FSDP itself runs on CPU (gloo), though accelerate does not put it there: a LoRA (or fully
    trained) UNet auto-wrapped per transformer block, gathered as ``accelerator.get_state_dict``
    gathers it, saves what the unwrapped model saves, which plain diffusers loads."""
    from safetensors.torch import load_file

    worker = tmp_path / "fsdp_worker.py"
    worker.write_text(FSDP_WORKER)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29523",
                    str(worker), str(tiny_models["sd"]), str(tmp_path), mode], check=True,
                   env={**os.environ, **CPU_ENV})
    if mode == "lora":
        _assert_same_lora(_lora_file(tmp_path / "sharded"), _lora_file(tmp_path / "unsharded"), rtol=0, atol=0)
        _loads_in_plain_diffusers(tiny_models["sd"], tmp_path / "sharded")
        return
    from diffusers import UNet2DConditionModel

    weights = "unet/diffusion_pytorch_model.safetensors"
    got, want = load_file(str(tmp_path / "sharded" / weights)), load_file(str(tmp_path / "unsharded" / weights))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    base = load_file(str(tiny_models["sd"] / weights))
    assert not all(torch.equal(got[k], base[k]) for k in base)  # the trained weights, not the base's
    UNet2DConditionModel.from_pretrained(str(tmp_path / "sharded"), subfolder="unet")


@pytest.mark.slow
def test_deepspeed_resume_latest_gives_the_unbroken_run(tiny_models, pair_parquet, tmp_path):
    """A ZeRO-2 run stopped after step 2 and resumed (accelerate loads the engine's checkpoint; the
    trainable-weights hooks stand aside) ends with the LoRA of the unbroken 3-step run."""
    pytest.importorskip("deepspeed", reason="deepspeed not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ACCELERATE_USE_DEEPSPEED": "true",
           "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29525",
              "-m", "diffalign.cli"]
    common = _common(tiny_models, pair_parquet, steps=3) + ["--train.checkpointing_steps=2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    subprocess.run([*launch, *common, f"--train.output_dir={whole}"], check=True, env=env)
    subprocess.run([*launch, *common, f"--train.output_dir={parts}", "--train.max_steps=2"], check=True, env=env)
    subprocess.run([*launch, *common, f"--train.output_dir={parts}", "--resume", "latest"], check=True, env=env)
    _assert_same_lora(_lora(parts), _lora(whole), rtol=0, atol=0)


def test_fsdp_clips_the_prepared_model_s_own_parameters():
    """Under FSDP accelerate calls FSDP's clip_grad_norm_ (a norm over all shards) only when given
    exactly the prepared model's parameters; elsewhere the trainable ones are clipped."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from diffalign.trainers.distributed import clip_parameters

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[0].requires_grad_(False)
    backbone = SimpleNamespace(module=model,
                               trainable_parameters=lambda: [p for p in model.parameters() if p.requires_grad])
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    ddp = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    assert clip_parameters(fsdp, backbone) == list(model.parameters())
    assert clip_parameters(ddp, backbone) == list(model[1].parameters())
