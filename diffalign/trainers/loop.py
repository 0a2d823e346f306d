"""The one training loop every method runs on (accelerate: DDP / FSDP / DeepSpeed, mixed precision).

Read top to bottom: ``setup`` builds backbone, method, data and optimiser from a recipe; ``train``
is the loop: take the next optimizer step from the run's step source → log → checkpoint → validate,
then ``final/``. The step source of stored-data methods (offline, reward backprop, video, text) is
:func:`data_steps`: batch → encode (cached) → noise → method loss → backward → step. On-line methods
bring their own (:func:`diffalign.trainers.online.rollout_steps`: rollout, then updates on it).

Determinism: the sample order, the noise and the timestep of every training example are functions
of ``(seed, position in the run)`` only, so a resumed run, or the same run on 2 processes with half
the accumulation, sees exactly the same examples with the same noise.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from diffalign.trainers.config import Recipe
from diffalign.trainers.data import find_encoded_set, load_training_data
from diffalign.trainers.distributed import (
    clip_parameters,
    configure_deepspeed,
    gathered_state_dict,
    is_deepspeed,
    is_sharded,
    no_zero3_init,
    warn_about_launch,
)
from diffalign.trainers.ema import WeightEMA
from diffalign.trainers.hub import check_push_to_hub, push_run
from diffalign.trainers.method import Method, StepOutput

CHECKPOINT_PREFIX = "step-"


@dataclass
class Run:
    """Everything ``train`` needs, built by :func:`setup`.

    ``backbone`` is the trained model (an image or video backbone, or a causal LM); ``data`` the batch
    source :func:`train_step` reads (stored data, prompts, tokenised text; ``None`` for on-line methods,
    whose method holds its prompts); ``epoch`` counts on-line rollout epochs (checkpointed). A step
    source that must stop for outside input (D3PO waiting for labels) sets ``stopped`` (a message) and
    ends: the run then ends without ``final/``.
    """

    recipe: Recipe
    accelerator: Accelerator
    backbone: object
    method: Method
    data: object | None
    optimizer: torch.optim.Optimizer | None = None
    lr_scheduler: object = None
    output_dir: Path = Path("runs/run")
    global_step: int = 0
    epoch: int = 0
    progress: object = None
    stopped: str | None = None
    ema: WeightEMA | None = None  # train.ema_decay > 0: the weights checkpoints, validation and final/ hand out


def handed_out_weights(run) -> contextlib.AbstractContextManager:
    """A context inside which the trainable weights are the ones ``run`` hands out: the EMA's
    (``train.ema_decay > 0``), else the trained weights themselves."""
    ema = getattr(run, "ema", None)
    return ema.applied() if ema is not None else contextlib.nullcontext()


def setup(recipe: Recipe, accelerator: Accelerator | None = None) -> Run:
    """The one setup, for every method: the accelerator (with the trackers of ``train.report_to``) and the
    seed; the model with its LoRA (or full fine-tuning); the method; its batch source; AdamW and the lr
    schedule (prepared by accelerate); then the method's own preparation.

    A method class adapts it through optional hooks (the defaults are the image methods'):

    * ``load_model(recipe, accelerator)`` (classmethod): the model, on the device, trainable: default
      :func:`load_backbone_for_training`; a causal LM for the text methods, a video backbone for DenseDPO;
    * ``build(recipe, model, accelerator)`` (classmethod): the method object: default
      ``recipe.method.build(model)``; ReFL adds its pre-training data;
    * ``training_data(run)``: the batch source ``batch(step, micro, process, num_processes)``: default
      the recipe's stored data of the method's ``data_kind`` (:func:`load_training_data`); prompts
      (reward backprop), tokenised text, video pairs, or ``None`` (on-line);
    * ``prepare(run)``: anything that needs the optimizer or the run (on-line methods' references);
    * ``steps(run)``: the step source, ``(row, boundary)`` events (default :func:`data_steps`);
    * ``save_state(folder)`` / ``load_state(folder)``: the method's own checkpointed state;
    * ``write_final(folder)``: files the method adds to ``final/`` beside the trained weights.
    """
    cls = recipe.method.entry.method_class
    accelerator = accelerator or make_accelerator(recipe)
    set_seed(recipe.train.seed)
    model = getattr(cls, "load_model", load_backbone_for_training)(recipe, accelerator)
    method = cls.build(recipe, model, accelerator) if hasattr(cls, "build") else recipe.method.build(model)
    run = Run(recipe, accelerator, model, method, None, output_dir=Path(recipe.train.output_dir))
    if hasattr(method, "training_data"):
        run.data = method.training_data(run)
    else:
        run.data = load_training_data(recipe, method.data_kind, model, run.output_dir, accelerator)
    run.optimizer, run.lr_scheduler = setup_optimizer(recipe, accelerator, model)
    run.ema = setup_ema(recipe, accelerator, model)
    if hasattr(method, "prepare"):
        method.prepare(run)
    return run


def make_accelerator(recipe: Recipe) -> Accelerator:
    """The run's accelerator: mixed precision, and the trackers of ``train.report_to`` logging under
    ``<output_dir>/logs/`` (started by :func:`tracking`)."""
    from accelerate.utils import ProjectConfiguration

    cfg = recipe.train
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=log_with(cfg.report_to),
                              project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                  logging_dir=str(output_dir / "logs")))
    warn_about_launch(accelerator)
    return accelerator


def load_backbone_for_training(recipe: Recipe, accelerator: Accelerator):
    """The recipe's image (or video) backbone on the accelerator's device, with a LoRA or full
    fine-tuning enabled (and gradient checkpointing if asked)."""
    from diffalign.models.loading import load_backbone, resolve_pretrained

    encoded = encoded_set_for(recipe)
    with no_zero3_init(accelerator):  # ZeRO-3: the engine shards the denoiser at prepare, nothing else
        backbone = load_backbone(resolve_pretrained(recipe.model.pretrained), family=recipe.model.family,
                                 revision=recipe.model.revision, variant=recipe.model.variant,
                                 allow_pickle=recipe.model.allow_pickle,
                                 **({"load_text_encoders": False} if encoded else {}))
    if encoded:
        backbone.drop_vae_encoder()
        if accelerator.is_main_process:
            print(f"data: {recipe.data.source} is encoded ({encoded['rows']} rows, by diffalign data encode): "
                  "no text encoder loaded, VAE encoder dropped")
    if recipe.model.embedded_guidance is not None:
        from diffalign.errors import UsageError

        if not getattr(backbone, "embeds_guidance", False):
            raise UsageError(f"model.embedded_guidance is set, but {recipe.model.pretrained} ({backbone.family}) has "
                             "no guidance embedding (only guidance-distilled models such as FLUX.1-dev do): unset it")
        backbone.guidance_scale = float(recipe.model.embedded_guidance)
    backbone.to(accelerator.device)
    if recipe.model.channels_last and accelerator.distributed_type not in (DistributedType.FSDP,
                                                                           DistributedType.DEEPSPEED):
        # frozen weights only, before the LoRA: trained (saved, optimizer-state) tensors stay contiguous
        backbone.use_channels_last(denoiser=recipe.model.lora_rank > 0)
    if recipe.model.lora_rank > 0:
        backbone.add_lora(rank=recipe.model.lora_rank, alpha=recipe.model.lora_alpha,
                          target_modules=recipe.model.lora_target_modules)
    else:
        backbone.enable_full_finetune()
    if recipe.model.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    return backbone


def setup_ema(recipe: Recipe, accelerator: Accelerator, backbone) -> WeightEMA | None:
    """The moving average of the trainable weights when ``train.ema_decay > 0`` (else ``None``)."""
    if not recipe.train.ema_decay:
        return None
    if uses_accelerate_state(accelerator):
        from diffalign.errors import UsageError

        raise UsageError("train.ema_decay is not supported under FSDP / DeepSpeed (their weights are sharded); "
                         "set train.ema_decay=0 or train on one process / DDP")
    module = accelerator.unwrap_model(backbone.module)
    return WeightEMA([(n, p) for n, p in module.named_parameters() if p.requires_grad], recipe.train.ema_decay)


def encoded_set_for(recipe: Recipe) -> dict | None:
    """The manifest of a ``diffalign data encode`` of this recipe's data when the run can use it alone: a
    stored-data method (the default batch source) with no validation images to sample."""
    cls = recipe.method.entry.method_class
    if hasattr(cls, "training_data") or hasattr(cls, "load_model") or getattr(cls, "data_kind", "pairs") is None:
        return None
    if recipe.train.validation_steps and recipe.train.validation_prompts:
        return None
    return find_encoded_set(recipe)


def setup_optimizer(recipe: Recipe, accelerator: Accelerator, backbone) -> tuple[torch.optim.Optimizer, object]:
    """AdamW (or 8-bit AdamW) on the trainable weights and the lr schedule; prepares the denoiser and
    optimizer with accelerate (DeepSpeed first gets the recipe's batch, accumulation and clipping) and
    registers the schedule with accelerate's checkpointing where that is the checkpoint format
    (FSDP / DeepSpeed, whose model and optimizer accelerate saves in its sharded format)."""
    from diffusers.optimization import get_scheduler

    cfg = recipe.train
    params = [p for p in backbone.trainable_parameters()]
    optimizer_cls = torch.optim.AdamW
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise ImportError("use_8bit_adam needs bitsandbytes: pip install 'diffalign[bnb]'") from e
        optimizer_cls = bnb.optim.AdamW8bit
    optimizer = optimizer_cls(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                              weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
    # stepped once per optimizer step by us (not by accelerate), so it is independent of the process count
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_steps)
    configure_deepspeed(accelerator, cfg)
    backbone.module, optimizer = accelerator.prepare(backbone.module, optimizer)
    if uses_accelerate_state(accelerator):  # FSDP / DeepSpeed checkpoints are accelerate's save_state
        accelerator.register_for_checkpointing(lr_scheduler)
    return optimizer, lr_scheduler


def train(recipe: Recipe) -> Path:
    """Run a recipe to the end, any method; returns the run directory (with ``final/``).

    Everything but the method's step is here, once: :func:`setup`, config.yaml, resume, metrics.jsonl
    and the trackers, progress, non-finite skipping, checkpoints, validation, ``final/``.
    """
    check_run_dir(recipe)
    check_push_to_hub(recipe.train)  # train.push_to_hub: refused now if it cannot happen (offline)
    run = setup(recipe)
    cfg, acc = recipe.train, run.accelerator
    if acc.is_main_process:
        if cfg.overwrite and not cfg.resume:
            clear_run_dir(run.output_dir)
        run.output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(run.output_dir)
    acc.wait_for_everyone()
    _maybe_resume(run)
    if acc.is_main_process:  # after a resume that worked: a failed one leaves the run as it was
        recipe.save(run.output_dir / "config.yaml")
        write_data_stats(run)

    metrics_path = run.output_dir / "metrics.jsonl"
    nonfinite_in_a_row, last_checkpoint = 0, run.global_step
    run.progress = tqdm(total=cfg.max_steps, initial=run.global_step, desc="train", disable=not acc.is_main_process)
    with tracking(run):
        for row, boundary in getattr(run.method, "steps", data_steps)(run):
            if row is not None:
                nonfinite_in_a_row = 0 if math.isfinite(row["loss"]) else nonfinite_in_a_row + 1
                if acc.is_main_process:
                    log_metrics(run, metrics_path, row)
                    run.progress.update(1)
                    run.progress.set_postfix(loss=f"{row['loss']:.4f}")
                    if nonfinite_in_a_row:
                        taken = "skipped" if row["skipped"] else "taken (DeepSpeed steps inside backward)"
                        print(f"step {run.global_step}: non-finite loss, step {taken} ({nonfinite_in_a_row} in a row)")
                if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                    raise RuntimeError(f"{nonfinite_in_a_row} non-finite losses in a row at step {run.global_step}; "
                                       f"stopping (train.max_nonfinite_steps={cfg.max_nonfinite_steps}). Lower the "
                                       "learning rate or beta.")
            every = cfg.checkpointing_steps
            if boundary and every and run.global_step // every > last_checkpoint // every:
                save_checkpoint(run, getattr(run.method, "save_state", None))
                last_checkpoint = run.global_step
            if row is not None and cfg.validation_steps and cfg.validation_prompts \
                    and run.global_step % cfg.validation_steps == 0:
                log_validation(run)
        run.progress.close()
        if acc.is_main_process:
            write_data_stats(run)
            if hasattr(run.data, "report"):
                run.data.report("end of run")
        if run.stopped is not None:  # the step source waits for outside input (e.g. labels): no final/
            if acc.is_main_process:
                print(run.stopped)
            return run.output_dir
        save_final(run)
        push_run(run)  # train.push_to_hub only
        return run.output_dir


RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "data_stats.json", "checkpoints", "final", "logs", "validation")


def check_run_dir(recipe: Recipe) -> None:
    """A run directory that holds an earlier run is continued (``--resume``) or replaced
    (``--overwrite``), never mixed into: a :class:`~diffalign.errors.UsageError` otherwise, before any
    model loads."""
    from diffalign.errors import UsageError

    cfg = recipe.train
    out = Path(cfg.output_dir)
    # what a run that trained has written (a run stopped before its first step, e.g. D3PO waiting for
    # labels, leaves only config.yaml, and its rerun continues it)
    earlier = [name for name in ("metrics.jsonl", "checkpoints", "final") if (out / name).exists()]
    if earlier and not cfg.resume and not cfg.overwrite:
        raise UsageError(f"{out} holds an earlier run ({', '.join(earlier)}): continue it with --resume latest, "
                         "replace it with --overwrite (train.overwrite=true), or pick another train.output_dir")


def clear_run_dir(out: Path) -> None:
    """Remove an earlier run's outputs from ``out`` (its latent cache stays: its entries are keyed by
    content and reusable)."""
    for name in RUN_OUTPUTS:
        path = Path(out) / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


TEMP_PREFIX = ".tmp-"  # what _atomic_dir and save_checkpoint write into before their rename


def remove_stale_temp_dirs(out: Path) -> list[Path]:
    """Remove the temp dirs (``.tmp-final-PID``, ``checkpoints/.tmp-step-N``) and files
    (``.tmp-metrics.jsonl``) a run killed while writing ``final/``, a checkpoint or the cut-back metrics
    left behind; a run starting in ``out`` writes none of its own yet. Returns what was removed."""
    removed = []
    for folder in (Path(out), Path(out) / "checkpoints"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if not path.name.startswith(TEMP_PREFIX):
                continue
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        print(f"removed {len(removed)} unfinished write(s) of an earlier run: {', '.join(p.name for p in removed)}")
    return removed


def data_steps(run: Run) -> Iterator[tuple[dict, bool]]:
    """The step source of the stored-data methods: :func:`train_step` until ``max_steps``; a checkpoint
    may follow any step."""
    acc, last = run.accelerator, run.recipe.train.max_steps
    if hasattr(run.data, "start"):  # DataLoader workers read ahead (data.num_workers)
        run.data.start(run.global_step, last, acc.process_index, acc.num_processes)
    try:
        while run.global_step < last:
            yield train_step(run), True
    finally:
        if hasattr(run.data, "close"):
            run.data.close()


# ---------------------------------------------------------------- metrics and trackers

TRACKER_PROJECT = "diffalign"  # accelerate's project name: TensorBoard logs go to <output_dir>/logs/diffalign/


def log_with(report_to: str | Sequence[str] | None) -> list[str] | str | None:
    """``train.report_to`` as accelerate's ``log_with``: None for ``None``/``"none"``, ``"all"``, or a
    list of tracker names (a comma-separated string is split); an unknown name is an error here,
    before any model loads."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    if report_to is None:
        return None
    names = [n.strip() for n in report_to.split(",")] if isinstance(report_to, str) else [str(n) for n in report_to]
    names = [n for n in names if n and n.lower() != "none"]
    if not names:
        return None
    if "all" in names:
        return "all"
    known = sorted(t.value for t in LoggerType if t.value != "all")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"train.report_to: unknown tracker(s) {unknown}; choose from none, all, {', '.join(known)}")
    missing = [n for n in names if n not in {str(t) for t in get_available_trackers()}]
    if missing:
        raise ImportError(f"train.report_to: {', '.join(missing)} not installed (pip install {' '.join(missing)})")
    return names


def write_data_stats(run) -> None:
    """``data_stats.json``: what the data readers have seen so far (rewritten at the end of the run)."""
    stats = data_stats(run)
    if stats is not None:
        (run.output_dir / "data_stats.json").write_text(json.dumps(stats, indent=2))


def data_stats(run) -> dict | None:
    """What the run's stored-data readers saw (rows read, kept, ties dropped, images skipped, the first
    skipped rows with why, labels), or None for a batch source without counts (prompts, on-line)."""
    stats = getattr(run.data, "stats", None)
    return stats.as_dict() if stats is not None and hasattr(stats, "as_dict") else None


def flat_config(recipe: Recipe) -> dict[str, int | float | str | bool]:
    """The recipe as one flat ``{"train.learning_rate": 1e-05, ...}`` mapping of scalars (the trackers'
    hyperparameters; lists and None are written as JSON text)."""
    out: dict[str, int | float | str | bool] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (bool, int, float, str)):
            out[prefix] = value
        else:
            out[prefix] = json.dumps(value, default=str)

    walk("", recipe.to_dict())
    return out


@contextlib.contextmanager
def tracking(run):
    """Start the accelerator's trackers (``train.report_to``) with the flat recipe as their config, and
    end them (flushing the logs) when the loop ends, normally or not. Nothing without trackers.

    A resumed run (``run.global_step`` > 0) tells TensorBoard to purge the earlier events from the
    step after the checkpoint on, as ``metrics.jsonl`` drops its lines after the checkpoint."""
    acc = run.accelerator
    if not acc.log_with:
        yield
        return
    name = run.output_dir.name
    init_kwargs = {"wandb": {"name": name}, "comet_ml": {"experiment_name": name}}
    if run.global_step > 0:
        init_kwargs["tensorboard"] = {"purge_step": run.global_step + 1}
    acc.init_trackers(TRACKER_PROJECT, config=flat_config(run.recipe), init_kwargs=init_kwargs)
    try:
        yield
    finally:
        acc.end_training()


def log_metrics(run, metrics_path: Path, row: dict) -> None:
    """Append ``row`` to ``metrics.jsonl`` and send its numbers to the trackers at ``row["step"]``
    (main process). Shared by the offline and the online loop."""
    with open(metrics_path, "a") as f:
        f.write(json.dumps(row) + "\n")
    if run.accelerator.log_with:
        scalars = {k: float(v) for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float))}
        run.accelerator.log(scalars, step=row["step"])


def save_final(run) -> Path:
    """Write the trained weights and their model card (``README.md``) to ``<output_dir>/final`` (main
    process, atomically; all processes take part in gathering sharded weights and wait for it) and return
    ``output_dir``."""
    acc = run.accelerator
    acc.wait_for_everyone()
    with handed_out_weights(run):
        state_dict = gathered_state_dict(acc, run.backbone.module)
        if acc.is_main_process:
            from diffalign.trainers.model_card import write_model_card

            def write(tmp: Path) -> None:
                run.backbone.save_trained(tmp, state_dict=state_dict)
                if hasattr(run.method, "write_final"):  # what the method adds to final/ (PPD's user adapter)
                    run.method.write_final(tmp)
                write_model_card(tmp, run.recipe, steps=run.global_step,
                                 metrics_path=run.output_dir / "metrics.jsonl", data_stats=data_stats(run),
                                 lora=run.recipe.model.lora_rank > 0)

            _atomic_dir(run.output_dir / "final", write)
    acc.wait_for_everyone()
    return run.output_dir


def train_step(run: Run) -> dict:
    """One optimizer step (all micro-batches of all processes); returns its metrics row.

    A non-finite loss on any process skips the update (gradients dropped) and is reported.
    """
    cfg, acc = run.recipe.train, run.accelerator

    def micro_loss(micro: int):
        return run.method.loss(run.data.batch(run.global_step, micro, acc.process_index, acc.num_processes))

    row = optimizer_step(run, [lambda m=m: micro_loss(m) for m in range(cfg.gradient_accumulation_steps)])
    if hasattr(run.data, "step_scalars"):  # rows read, kept, skipped by reason (bad rows are met when read)
        row.update(run.data.step_scalars())
    return row


def optimizer_step(run, micro_losses: Sequence[Callable[[], StepOutput]]) -> dict:
    """Accumulate the gradients of ``micro_losses`` (each a call giving one micro-batch's
    :class:`StepOutput`; the mean is taken), then clip and step; returns the metrics row.

    Gradients are synchronised across processes on the last micro-batch only. A non-finite loss on
    any process skips the update (gradients dropped) and is reported.

    Under DeepSpeed the engine reduces, clips (``gradient_clipping``, from ``max_grad_norm``) and steps
    inside the last micro-batch's backward; ``grad_norm`` is its global norm, and ``skipped`` says
    whether it skipped the step (its fp16 loss scaler on overflow): a non-finite bf16/fp32 loss
    cannot be held back there (the loops count non-finite losses, not skipped steps, against
    ``train.max_nonfinite_steps``, so such a run still stops).
    """
    cfg, acc = run.recipe.train, run.accelerator
    t0 = time.perf_counter()
    logs: list[dict[str, torch.Tensor]] = []
    finite = True
    n = len(micro_losses)
    deepspeed = is_deepspeed(acc)
    for micro, compute in enumerate(micro_losses):
        last = micro == n - 1
        if deepspeed:  # the engine reduces and steps inside backward, at the boundary it is told
            acc.sync_gradients = last
        with contextlib.nullcontext() if last or deepspeed else acc.no_sync(run.backbone.module):
            out = compute()
            finite &= bool(torch.isfinite(out.loss.detach()))
            if deepspeed:  # the mean over micro-batches is ours: the engine must not divide again
                acc.backward(out.loss / n, scale_wrt_gas=False)
            else:
                acc.backward(out.loss / n)
        logs.append({"loss": out.loss.detach(), **out.metrics})

    finite = bool(acc.gather(torch.tensor([float(finite)], device=acc.device)).min() > 0)
    grad_norm, lr = None, run.lr_scheduler.get_last_lr()[0]
    if deepspeed:  # it stepped (clipping at gradient_clipping) in the last backward
        norm = acc.clip_grad_norm_(run.backbone.trainable_parameters(), cfg.max_grad_norm)
        grad_norm = None if norm is None else float(norm)
        skipped = bool(getattr(run.optimizer, "step_was_skipped", False))
        if not skipped:
            run.lr_scheduler.step()
    else:
        if finite:
            if cfg.max_grad_norm > 0:
                grad_norm = float(acc.clip_grad_norm_(clip_parameters(acc, run.backbone), cfg.max_grad_norm))
            run.optimizer.step()
            run.lr_scheduler.step()
            if run.ema is not None:
                run.ema.update()
        skipped = not finite
    run.optimizer.zero_grad(set_to_none=True)
    run.global_step += 1
    row = _reduce_logs(acc, logs)
    return {"step": run.global_step, "loss": row.pop("loss"), "lr": lr, **row,
            "grad_norm": grad_norm, "skipped": skipped, "seconds": time.perf_counter() - t0}


def _reduce_logs(acc: Accelerator, logs: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Mean of each metric over micro-batches and processes (one gather for all of them)."""
    keys = sorted({k for d in logs for k in d})
    local = torch.stack([torch.stack([d[k].detach().float().reshape(()) for d in logs if k in d]).mean()
                         for k in keys]).to(acc.device)
    gathered = acc.gather(local[None]).reshape(-1, len(keys)).mean(0)
    return {k: float(v) for k, v in zip(keys, gathered)}


# ---------------------------------------------------------------- checkpoints


def _atomic_dir(final: Path, write) -> None:
    """Write a directory through a temp dir and a rename: readers never see it half-written."""
    tmp = final.with_name(f"{TEMP_PREFIX}{final.name}-{os.getpid()}")  # a killed run's: remove_stale_temp_dirs
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def uses_accelerate_state(acc: Accelerator) -> bool:
    """FSDP and DeepSpeed shard the optimizer (and the model): their checkpoints are accelerate's own
    ``save_state`` folders (which pickle the optimizer, schedule and RNG states). Every other run's
    checkpoint holds safetensors and JSON only (:mod:`diffalign.trainers.checkpoint_state`)."""
    return is_deepspeed(acc) or is_sharded(acc)


def save_checkpoint(run: Run, write_extra: Callable[[Path], None] | None = None) -> Path | None:
    """``checkpoints/step-N/``: the trainable weights (``trainable.safetensors``), the optimizer, lr
    schedule and RNG states (safetensors + JSON; FSDP / DeepSpeed: accelerate's state), the trainer state,
    and the weights in diffusers format (``load_lora_weights`` loads the folder). ``write_extra(folder)``
    adds a trainer's own state (main process, before the atomic rename). Weights that are not finite are
    never checkpointed (None is returned), so ``--resume latest`` always finds finite ones."""
    from safetensors.torch import save_file

    from diffalign.trainers.checkpoint_state import save_training_state

    acc = run.accelerator
    final = run.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{run.global_step}"
    finite = all(bool(torch.isfinite(p.detach()).all()) for p in run.backbone.trainable_parameters())
    if not bool(acc.gather(torch.tensor([float(finite)], device=acc.device)).min() > 0):
        if acc.is_main_process:  # `latest` stays the last checkpoint of finite weights
            print(f"step {run.global_step}: the trainable weights are not finite; no checkpoint written")
        return None
    tmp = final.with_name(f"{TEMP_PREFIX}{final.name}")
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    if uses_accelerate_state(acc):
        acc.save_state(str(tmp))
    elif acc.is_main_process:
        tmp.mkdir(parents=True)
        trainable = {n: p.detach().cpu().contiguous()
                     for n, p in acc.unwrap_model(run.backbone.module).named_parameters() if p.requires_grad}
        save_file(trainable, str(tmp / "trainable.safetensors"))
        save_training_state(tmp, run.optimizer, run.lr_scheduler)
    with handed_out_weights(run):  # the diffusers-format weights are the ones final/ would hold
        state_dict = gathered_state_dict(acc, run.backbone.module)  # every process: the gather is collective
        if acc.is_main_process:
            trainer_state = {"global_step": run.global_step, "epoch": run.epoch}
            if run.ema is not None:
                run.ema.save(tmp)
                trainer_state["ema_updates"] = run.ema.updates
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
            run.backbone.save_trained(tmp, state_dict=state_dict)
            if hasattr(run.method, "write_final"):  # a checkpoint loads for inference as final/ does
                run.method.write_final(tmp)
    if acc.is_main_process:
        if write_extra is not None:
            write_extra(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune_checkpoints(run)
    acc.wait_for_everyone()
    return final


def _prune_checkpoints(run: Run) -> None:
    limit = run.recipe.train.checkpoints_total_limit
    if not limit:
        return
    for old in list_checkpoints(run.output_dir)[:-limit]:
        shutil.rmtree(old)


def list_checkpoints(output_dir: Path) -> list[Path]:
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def _load_checkpoint_state(run: Run, ckpt: Path) -> None:
    """Trainable weights, optimizer, schedule and RNG of a checkpoint (safetensors and JSON only; FSDP /
    DeepSpeed: accelerate's ``load_state``). A checkpoint in accelerate's pickled format (written by an
    earlier diffalign) is refused: unpickling a file can run code."""
    from safetensors.torch import load_file

    from diffalign.errors import UsageError
    from diffalign.trainers.checkpoint_state import (
        FILES,
        has_training_state,
        load_training_state,
    )

    acc = run.accelerator
    if uses_accelerate_state(acc):
        acc.load_state(str(ckpt))
        return
    if not has_training_state(ckpt) and not any((ckpt / name).exists() for name in ACCELERATE_PICKLES):
        missing = [name for name in FILES if not (ckpt / name).is_file()]
        raise FileNotFoundError(f"{ckpt}: incomplete checkpoint, {', '.join(missing)} missing")
    if not has_training_state(ckpt):
        raise UsageError(f"{ckpt}: no optimizer.safetensors / scheduler.json / random_states.json: not a "
                         "checkpoint of this diffalign (older ones pickled their state, which is not read, since "
                         "unpickling a file can run code); start the run again or resume from a newer checkpoint")
    model = acc.unwrap_model(run.backbone.module)
    missing = model.load_state_dict(load_file(str(ckpt / "trainable.safetensors")), strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"checkpoint {ckpt} has unexpected keys {missing.unexpected_keys[:5]}")
    load_training_state(ckpt, run.optimizer, run.lr_scheduler)


ACCELERATE_PICKLES = ("optimizer.bin", "scheduler.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl")
"""What accelerate's pickled ``save_state`` format holds: such a checkpoint is refused, not treated as damaged."""


def _maybe_resume(run: Run) -> Path | None:
    """Load ``train.resume`` (``latest`` or a folder) into the run; returns the checkpoint used.

    ``latest`` takes the newest checkpoint that reads: one that does not (truncated or missing files, bad
    JSON) is reported and the one before it is tried. A named folder that does not read is an error
    naming it. ``metrics.jsonl`` is cut back to the resumed step (to nothing when ``latest`` finds no
    checkpoint), and the lr schedule continues as the recipe now gives it (:func:`_continue_schedule`)."""
    from diffalign.errors import UsageError

    resume = run.recipe.train.resume
    if not resume:
        return None
    main = run.accelerator.is_main_process
    metrics = run.output_dir / "metrics.jsonl"
    if resume == "latest":
        candidates = list_checkpoints(run.output_dir)[::-1]
        if not candidates:
            if main:
                print(f"--resume latest: no checkpoint in {run.output_dir / 'checkpoints'}, starting from scratch")
                cut_metrics(metrics, 0)
            return None
    else:
        candidates = [Path(resume)]
        if not (candidates[0] / "trainer_state.json").is_file():
            raise UsageError(f"--resume {resume}: not a diffalign checkpoint (no trainer_state.json)")
    base_lrs = list(getattr(run.lr_scheduler, "base_lrs", []))  # the recipe's, before a checkpoint's replace them
    failures = []
    for ckpt in candidates:
        try:
            _load_checkpoint_state(run, ckpt)
            state = json.loads((ckpt / "trainer_state.json").read_text())
            global_step, epoch = int(state["global_step"]), int(state.get("epoch", 0))
            if run.ema is not None:
                run.ema.load(ckpt, int(state.get("ema_updates", 0)))
            if hasattr(run.method, "load_state"):
                run.method.load_state(ckpt)
        except UsageError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged checkpoint: say which and why, try the one before
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if resume != "latest":
                raise UsageError(f"--resume {ckpt}: the checkpoint cannot be read ({why})") from e
            failures.append(f"{ckpt.name} ({why})")
            if main:
                print(f"warning: --resume latest: {ckpt} cannot be read ({why}); trying the checkpoint before it")
            continue
        break
    else:
        raise UsageError(f"--resume latest: no checkpoint in {run.output_dir / 'checkpoints'} can be read: "
                         + "; ".join(failures))
    run.global_step, run.epoch = global_step, epoch
    _continue_schedule(run, base_lrs)
    if main:
        cut_metrics(metrics, run.global_step)
        print(f"resumed from {ckpt} at step {run.global_step}")
    return ckpt


def cut_metrics(path: Path, step: int) -> None:
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (atomically); a line that is not a JSON row (the
    partial last line of a run killed mid-write) is dropped, and counted in a note."""
    if not path.exists():
        return
    kept, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row_step = json.loads(line)["step"]
            keep = row_step <= step
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if keep:
            kept.append(line)
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    if bad:
        print(f"{path}: dropped {bad} line(s) that are not JSON rows (a run killed while writing one)")


def _continue_schedule(run: Run, base_lrs: list[float]) -> None:
    """After a resume, the lr is the recipe's schedule at the resumed step, as if the run had had this
    recipe's ``learning_rate``, ``lr_scheduler``, ``lr_warmup_steps`` and ``max_steps`` all along. The
    checkpoint's own last lr reflects the schedule it was written under: a cosine run to step N ends at lr 0,
    and a resume with a larger ``max_steps`` would otherwise take its first step at lr 0. A note says when
    the lr changes."""
    sched = run.lr_scheduler
    lambdas = getattr(sched, "lr_lambdas", None)
    if lambdas is None or not base_lrs or len(base_lrs) != len(lambdas):
        return
    groups = sched.optimizer.param_groups
    before = [g["lr"] for g in groups]
    lrs = [base * fn(sched.last_epoch) for base, fn in zip(base_lrs, lambdas)]
    sched.base_lrs = list(base_lrs)
    for group, lr, base in zip(groups, lrs, base_lrs):
        group["lr"], group["initial_lr"] = lr, base
    sched._last_lr = list(lrs)
    changed = any(not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for a, b in zip(before, lrs))
    if changed and run.accelerator.is_main_process:
        t = run.recipe.train
        print(f"resume: lr {lrs[0]:.3g} at step {sched.last_epoch} from this recipe's schedule ({t.lr_scheduler}, "
              f"{t.lr_warmup_steps} warm-up, max_steps {t.max_steps}, learning_rate {t.learning_rate:g}); the "
              f"checkpoint's schedule was at {before[0]:.3g}")


# ---------------------------------------------------------------- validation


@torch.no_grad()
def log_validation(run: Run) -> Path | None:
    """Sample the validation prompts with the weights the run hands out (the EMA's when on); saves
    ``validation/step-N.png``.

    Not under FSDP / ZeRO-3: the pipeline calls the bare denoiser, which holds one shard (a note is
    printed instead)."""
    if not run.accelerator.is_main_process:
        return None
    if is_sharded(run.accelerator):
        print(f"step {run.global_step}: validation images skipped, the denoiser is sharded (FSDP / ZeRO-3)")
        return None
    from diffalign.eval.generate import guidance_kwargs
    from diffalign.eval.grid import image_grid

    cfg = run.recipe.train
    pipe = run.backbone.pipeline
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    # the pipeline's CFG arguments for the weight, as `diffalign eval` passes them (Qwen-Image's true_cfg_scale)
    guidance = guidance_kwargs(pipe, cfg.validation_guidance_scale, len(cfg.validation_prompts), {})
    with handed_out_weights(run):
        images = pipe(cfg.validation_prompts, num_inference_steps=cfg.validation_num_inference_steps,
                      generator=generator, **guidance).images
    path = run.output_dir / "validation" / f"step-{run.global_step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, cols=min(4, len(images))).save(path)
    for tracker in run.accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.log_images({"validation": np.stack([np.asarray(im.convert("RGB")) for im in images])},
                               step=run.global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": images}, step=run.global_step)
    return path

