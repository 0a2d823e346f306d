"""What the loop needs to know about accelerate's distributed modes (DDP, FSDP, DeepSpeed ZeRO).

* :func:`gathered_state_dict`: the full state dict of a sharded model (FSDP, ZeRO-3), which every
  process must take part in building; ``None`` where the bare module already holds every weight.
* :func:`clip_parameters`: what to clip so that FSDP clips by the norm over all shards.
* :func:`configure_deepspeed`: the recipe's micro-batch size, gradient accumulation and clipping
  written into the DeepSpeed plugin's config before ``accelerator.prepare`` (which needs them: the
  loop prepares no dataloader for accelerate to read a batch size from).
* :func:`no_zero3_init`: load models whole under ZeRO-3 (only the prepared denoiser is sharded).
* :func:`launch_warning`: one line when more processes were asked for than accelerate runs.

Nothing here imports DeepSpeed: runs without it never reach the DeepSpeed branches.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Mapping

from accelerate.utils import DistributedType

TORCHRUN_WORKAROUND = "ACCELERATE_USE_CPU=true torchrun --nproc_per_node={n} -m diffalign.cli train RECIPE.yaml"


def is_deepspeed(accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def is_sharded(accelerator) -> bool:
    """FSDP, or DeepSpeed ZeRO stage 3: the bare module holds only this process's shard of the weights."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return True
    if is_deepspeed(accelerator):
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return False


def clip_parameters(accelerator, backbone) -> list:
    """The parameters to give ``accelerator.clip_grad_norm_``: the trainable ones, but under FSDP all of
    the prepared denoiser's. Only that exact list makes accelerate call FSDP's own ``clip_grad_norm_``,
    which reduces the norm over the shards; with any other list each process clips its shard by that
    shard's norm (frozen weights have no gradient and add nothing)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return list(backbone.module.parameters())
    return backbone.trainable_parameters()


def gathered_state_dict(accelerator, model) -> dict | None:
    """``accelerator.get_state_dict(model)`` when ``model`` is sharded, else ``None`` (the bare module's
    own weights are complete; nothing is copied).

    Collective under FSDP / ZeRO-3: call it on every process. FSDP gives the full dict on the main
    process only (offloaded to CPU), the others get an empty one; ZeRO-3 needs
    ``zero3_save_16bit_model: true`` in the accelerate config (accelerate says so otherwise).
    """
    if not is_sharded(accelerator):
        return None
    return accelerator.get_state_dict(model)


# ---------------------------------------------------------------- DeepSpeed


@contextlib.contextmanager
def no_zero3_init(accelerator) -> Iterator[None]:
    """Inside, ``from_pretrained`` builds whole modules even under ZeRO-3 with ``zero3_init_flag``.

    DeepSpeed's ``zero.Init`` would partition every module loaded (the frozen VAE and text encoders
    too, which no engine gathers); the engine partitions the denoiser when ``prepare`` wraps it.
    transformers decides by the ZeRO-3 config accelerate registers with it (whatever
    ``zero3_init_flag`` says), so that registration is lifted inside and restored after."""
    if not is_deepspeed(accelerator):
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    plugin = accelerator.state.deepspeed_plugin
    with plugin.zero3_init_context_manager(enable=False):
        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()



def deepspeed_settings(train, num_processes: int) -> dict[str, int | float]:
    """The DeepSpeed config values that the recipe's ``train`` section decides.

    ``train_micro_batch_size_per_gpu`` is ``train.batch_size`` (per process, as the loop's batch
    source reads it), ``gradient_accumulation_steps`` and ``gradient_clipping`` (``max_grad_norm``;
    0 switches clipping off, as in the loop) are the recipe's, and ``train_batch_size`` their product
    with the process count, as DeepSpeed checks it.
    """
    return {
        "train_micro_batch_size_per_gpu": int(train.batch_size),
        "gradient_accumulation_steps": int(train.gradient_accumulation_steps),
        "train_batch_size": int(train.batch_size) * int(train.gradient_accumulation_steps) * int(num_processes),
        "gradient_clipping": float(train.max_grad_norm),
    }


def apply_deepspeed_settings(ds_config: dict, settings: Mapping[str, int | float]) -> dict:
    """Write ``settings`` into a DeepSpeed config dict where it says ``"auto"`` or leaves a key out;
    a different explicit value is an error naming the key (the recipe is what the loop runs).
    Returns ``ds_config`` (changed in place)."""
    conflicts = []
    for key, value in settings.items():
        current = ds_config.get(key, "auto")
        if current == "auto" or current is None:
            ds_config[key] = value
        elif float(current) != float(value):
            conflicts.append(f"{key}: {current} in the DeepSpeed config, {value} from the recipe")
    if conflicts:
        raise ValueError("DeepSpeed config disagrees with the recipe (set these to 'auto' in the DeepSpeed "
                         "config, or change the recipe's train section): " + "; ".join(conflicts))
    return ds_config


def configure_deepspeed(accelerator, train) -> None:
    """Before ``accelerator.prepare``: give the active DeepSpeed plugin the recipe's batch, accumulation
    and clipping (:func:`deepspeed_settings`). Nothing outside DeepSpeed runs."""
    if not is_deepspeed(accelerator):
        return
    plugin = accelerator.state.deepspeed_plugin
    apply_deepspeed_settings(plugin.deepspeed_config, deepspeed_settings(train, accelerator.num_processes))
    # accelerate compares its own count with DeepSpeed's at prepare; under DeepSpeed it only tells the engine
    accelerator.gradient_accumulation_steps = int(train.gradient_accumulation_steps)


# ---------------------------------------------------------------- launch check


def _int_env(env: Mapping[str, str], *names: str) -> int | None:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value)
            except ValueError:
                return None
    return None


def launch_warning(env: Mapping[str, str], num_processes: int) -> str | None:
    """One warning line when more processes were asked for than accelerate runs, else ``None``.

    * A launcher said ``WORLD_SIZE`` (torchrun; ``PMI_SIZE`` / ``OMPI_COMM_WORLD_SIZE`` for MPI) is
      N > 1, but accelerate runs each process alone (``num_processes == 1``): torchrun on a machine
      without GPUs and without ``ACCELERATE_USE_CPU=true``. The N processes train N separate copies.
    * ``accelerate launch --cpu --num_processes N``: accelerate's CPU launcher starts the script once
      (``accelerate/commands/launch.py``: ``--cpu`` goes to ``simple_launcher``), setting
      ``ACCELERATE_USE_CPU`` and, for N > 1, ``MASTER_ADDR``/``MASTER_PORT``, but no ``WORLD_SIZE``.
    """
    if num_processes > 1:
        return None
    asked = _int_env(env, "WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    if asked is not None and asked > 1:
        return (f"warning: {asked} processes were launched (WORLD_SIZE={asked}) but accelerate runs each one "
                f"alone, training {asked} separate copies; on CPUs run: {TORCHRUN_WORKAROUND.format(n=asked)}")
    cpu = env.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes", "y", "on")
    if asked is None and cpu and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return ("warning: `accelerate launch --cpu --num_processes N` started one process (accelerate's CPU "
                "launcher does not start N); this run trains on 1 process. For N CPU processes run: "
                + TORCHRUN_WORKAROUND.format(n="N"))
    return None


def warn_about_launch(accelerator, env: Mapping[str, str] | None = None) -> str | None:
    """Print :func:`launch_warning` (to stderr) and return it."""
    message = launch_warning(os.environ if env is None else env, accelerator.num_processes)
    if message is not None:
        print(message, file=sys.stderr, flush=True)
    return message
