"""`diffalign bench RECIPE.yaml`: training throughput and peak memory.

Runs the recipe's method for a few optimizer steps twice over the same examples: first with an
empty latent/text cache (VAE and text encoders run), then cached (they do not). Reports pairs/s
(examples/s for single-sample methods) for each pass, the compute floor (the loss's policy and reference
forwards and its backward on one fixed batch, timed alone) with the cached step's ratio to it, and the
peak memory (CUDA allocator peak on a GPU, peak resident set size on a CPU).

`diffalign bench RECIPE.yaml --sampling`: rollout throughput of the on-line methods instead:
trajectories/s of :func:`diffalign.core.sampling.sample_trajectory` (every latent and per-step
log-prob recorded, CFG included) on the recipe's model at its sampling size (:func:`sampling_resolution`),
and the peak memory. On flow models ``--sde-type cps`` times the coefficient-preserving SDE (default: the
recipe method's ``sde_type``) and ``--sde-window START,END`` an ODE rollout with the SDE on those steps only
(Flow-GRPO-Fast, MixGRPO).

For a reward-backprop recipe (AlignProp, DRaFT-K, DRaFT-LV, ReFL) `diffalign bench RECIPE.yaml`
times whole training steps instead: sampling with gradients, VAE decoding, the differentiable
reward and the backward pass; it reports optimizer steps/s, prompts/s and the peak memory.

For an on-line recipe (DDPO, GRPO, Flow-GRPO and its variants, Pref-GRPO, D3PO, SePPO) `diffalign bench RECIPE.yaml`
times the method's two phases separately: one rollout (sampling with log-probs, rewards or labels,
advantages; trajectories/s) and ``--steps`` optimizer steps of its updates on the stored transitions
(steps/s, each step ``train.batch_size × gradient_accumulation_steps`` units at the trained denoising
steps), and the peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time

import torch

ACCEPTS_OVERRIDES = True  # the dispatcher collects --section.key=value into args.overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML (see pipelines/)")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per pass (--sampling: sampling calls)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each timed pass")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    sampling = parser.add_argument_group("sampling mode")
    sampling.add_argument("--sampling", action="store_true",
                          help="time sampling with per-step log-probs (trajectories/s) instead of training")
    sampling.add_argument("--num-steps", type=int, default=20, help="sampler steps per trajectory")
    sampling.add_argument("--batch-size", type=int, default=4, help="trajectories per sampling call")
    sampling.add_argument("--eta", type=float, default=None,
                          help="DDIM eta / flow noise level (default: 1.0 DDIM, 0.7 flow)")
    sampling.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance weight")
    sampling.add_argument("--sde-type", choices=("sde", "cps"), default=None,
                          help="flow models' SDE: sde (Flow-GRPO) or cps (coefficient-preserving); "
                               "default: the recipe's method.sde_type, else sde")
    sampling.add_argument("--sde-window", default=None, metavar="START,END",
                          help="flow models: noise only at steps START <= i < END, ODE elsewhere "
                               "(Flow-GRPO-Fast / MixGRPO windows)")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss_kb / 1024 if sys.platform != "darwin" else rss_kb / 2**20


def bench(recipe, steps: int = 5, warmup: int = 1) -> dict:
    """Time ``steps`` optimizer steps uncached then cached; returns the numbers as a dict."""
    from diffalign.trainers.loop import setup, train_step

    with tempfile.TemporaryDirectory() as tmp:
        recipe.train.output_dir = tmp
        recipe.data.cache_dir = f"{tmp}/cache"
        recipe.train.max_steps = max(recipe.train.max_steps, 2 * (steps + warmup))
        run = setup(recipe)
        per_step = recipe.train.batch_size * recipe.train.gradient_accumulation_steps * run.accelerator.num_processes
        device = run.accelerator.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def timed_pass(first_position_step: int) -> float:
            run.global_step = first_position_step
            for _ in range(warmup):
                train_step(run)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(run)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return steps * per_step / (time.perf_counter() - t0)

        uncached = timed_pass(0)      # every example is new: VAE + text encoders run
        cached = timed_pass(0)        # the same positions again: all latents/embeddings from the cache
        floor = compute_floor(run, steps, warmup)
        cached_step_s = per_step / cached
        return {
            "method": recipe.method["name"],
            "model": recipe.model.pretrained,
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "resolution": recipe.data.resolution,
            "batch_per_step": per_step,
            "steps": steps,
            "pairs_per_s_uncached": uncached,
            "pairs_per_s_cached": cached,
            "floor_step_s": floor,
            "pairs_per_s_floor": per_step / floor,
            "cached_over_floor": cached_step_s / floor,
            "peak_memory_mb": peak_memory_mb(device),
            "mixed_precision": recipe.train.mixed_precision,
        }


def compute_floor(run, steps: int = 5, warmup: int = 1) -> float:
    """Seconds of an optimizer step's compute alone: the method's loss (policy forward, reference forward)
    and its backward on one fixed micro-batch, times the accumulation steps; no data, no optimizer step,
    no logging. A training step's time over this is its overhead."""
    acc, device = run.accelerator, run.accelerator.device
    batch = run.data.batch(0, 0, acc.process_index, acc.num_processes)

    def once() -> None:
        out = run.method.loss(batch)
        acc.backward(out.loss)
        run.optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        once()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps * run.recipe.train.gradient_accumulation_steps


def bench_backprop(recipe, steps: int = 5, warmup: int = 1) -> dict:
    """Time ``steps`` optimizer steps of a reward-backprop recipe (after ``warmup`` untimed ones);
    returns steps/s, prompts/s and peak memory as a dict."""
    from diffalign.trainers.loop import setup, train_step

    with tempfile.TemporaryDirectory() as tmp:
        recipe.train.output_dir = tmp
        recipe.data.cache_dir = f"{tmp}/cache"  # ReFL's regulariser data, if it reads the data section
        recipe.train.max_steps = max(recipe.train.max_steps, steps + warmup)
        run = setup(recipe)
        cfg, device = run.method.config, run.accelerator.device
        prompts = recipe.train.batch_size * recipe.train.gradient_accumulation_steps * run.accelerator.num_processes
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(warmup):
            train_step(run)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        rows = [train_step(run) for _ in range(steps)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        if any(r["skipped"] for r in rows):
            raise RuntimeError("a timed step had a non-finite loss")
        return {
            "method": recipe.method["name"],
            "model": recipe.model.pretrained,
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "resolution": cfg.resolution,
            "num_steps": cfg.num_steps,
            "guidance_scale": cfg.guidance_scale,
            "reward": cfg.reward,
            "prompts_per_step": prompts,
            "steps": steps,
            "steps_per_s": steps / elapsed,
            "prompts_per_s": steps * prompts / elapsed,
            "peak_memory_mb": peak_memory_mb(device),
            "mixed_precision": recipe.train.mixed_precision,
        }


def bench_online(recipe, steps: int = 5, warmup: int = 1) -> dict:
    """Time one rollout of an on-line recipe, then ``steps`` optimizer steps on it (after ``warmup``
    untimed ones; further rollouts are sampled, untimed, when one has fewer steps); returns
    trajectories/s, optimizer steps/s and peak memory as a dict."""
    from diffalign.trainers.loop import setup
    from diffalign.trainers.online import epoch_plans, online_step, run_rollout

    with tempfile.TemporaryDirectory() as tmp:
        recipe.train.output_dir = tmp
        recipe.data.cache_dir = f"{tmp}/cache"  # SePPO's winners, when they come from the data section
        recipe.train.max_steps = max(recipe.train.max_steps, steps + warmup)
        run = setup(recipe)
        cfg, device = run.method.config, run.accelerator.device

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t0 = time.perf_counter()
        rollout = run_rollout(run)
        sync()
        rollout_seconds = time.perf_counter() - t0
        trajectories = len(rollout.traj) if rollout.traj is not None else len(rollout.prompts)

        def optimizer_steps():  # the rollout's steps, then those of fresh rollouts (their sampling untimed)
            nonlocal rollout
            while True:
                for plan in epoch_plans(run, rollout):
                    for micros in plan:
                        yield lambda micros=micros, rollout=rollout: online_step(run, rollout, micros)
                run.method.end_epoch(run, run.epoch)
                run.epoch += 1
                rollout = run_rollout(run)

        pending = optimizer_steps()
        for _ in range(warmup):
            next(pending)()
        step_seconds, rows = 0.0, []
        for _ in range(steps):
            step = next(pending)  # may sample a new rollout: not timed
            sync()
            t0 = time.perf_counter()
            rows.append(step())
            sync()
            step_seconds += time.perf_counter() - t0
        if any(r["skipped"] for r in rows):
            raise RuntimeError("a timed step had a non-finite loss")
        return {
            "mode": "online",
            "method": recipe.method["name"],
            "model": recipe.model.pretrained,
            "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
            "resolution": cfg.resolution,
            "num_steps": cfg.num_steps,
            "guidance_scale": cfg.guidance_scale,
            "rollout_trajectories": trajectories,
            "rollout_seconds": rollout_seconds,
            "trajectories_per_s": trajectories / rollout_seconds,
            "units_per_step": recipe.train.batch_size * recipe.train.gradient_accumulation_steps,
            "steps": steps,
            "steps_per_s": steps / step_seconds,
            "peak_memory_mb": peak_memory_mb(device),
            "mixed_precision": recipe.train.mixed_precision,
        }


def sampling_resolution(recipe, backbone) -> int:
    """The size the recipe samples at: an on-line method's ``resolution`` if set, else the pipeline's own
    default (``default_sample_size × vae_scale_factor``: 64 px for the Shapes base, 1024 for SDXL), not the
    data section's training resolution (512 by default, which a sampling-only recipe never sets)."""
    size = getattr(recipe.method.config, "resolution", None)
    if size:
        return int(size)
    pipe = backbone.pipeline
    latent = getattr(pipe, "default_sample_size", None) or backbone.raw_denoiser.config.sample_size
    return int(latent * pipe.vae_scale_factor)


def bench_sampling(recipe, batches: int = 5, warmup: int = 1, num_steps: int = 20, batch_size: int = 4,
                   eta: float | None = None, guidance_scale: float = 5.0, sde_type: str | None = None,
                   sde_window: tuple[int, int] | None = None) -> dict:
    """Time ``batches`` calls of ``sample_trajectory`` (``batch_size`` trajectories of ``num_steps``
    steps each) on the recipe's model; returns trajectories/s and peak memory as a dict. Flow models
    take ``sde_type`` (default: the recipe method's, else ``sde``) and an SDE window ``(start, end)``."""
    from diffalign.core.sampling import make_sampler, sample_trajectory
    from diffalign.models.loading import load_backbone, resolve_pretrained

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(recipe.train.mixed_precision, torch.float32)
    dtype = dtype if device.type == "cuda" else torch.float32
    backbone = load_backbone(resolve_pretrained(recipe.model.pretrained), family=recipe.model.family,
                             revision=recipe.model.revision, variant=recipe.model.variant,
                             torch_dtype=None if dtype == torch.float32 else dtype)
    backbone.to(device)
    if sde_type is None:
        sde_type = getattr(recipe.method.config, "sde_type", "sde")
    sampler = make_sampler(backbone, num_steps, eta=eta, sde_type=sde_type, sde_window=sde_window)
    prompts = ["a photo of a red cat and a blue dog"] * batch_size
    cond = backbone.encode_prompt(prompts)
    generator = torch.Generator(device).manual_seed(recipe.train.seed)
    size = sampling_resolution(recipe, backbone)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def one_batch():
        return sample_trajectory(backbone, sampler, cond, guidance_scale=guidance_scale, generator=generator,
                                 height=size, width=size)

    for _ in range(warmup):
        one_batch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(batches):
        traj = one_batch()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    if not torch.isfinite(traj.log_probs).all():
        raise RuntimeError("sampling produced non-finite log-probs")
    return {
        "mode": "sampling",
        "model": recipe.model.pretrained,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "resolution": size,
        "sampler": sampler.kind,
        "eta": sampler.eta,
        "sde_type": getattr(sampler, "sde_type", None),
        "sde_window": None if getattr(sampler, "sde_window", None) is None else list(sampler.sde_window),
        "stochastic_steps": int((sampler.stds > 0).sum()),
        "num_steps": num_steps,
        "guidance_scale": guidance_scale,
        "batch_size": batch_size,
        "batches": batches,
        "trajectories_per_s": batches * batch_size / elapsed,
        "peak_memory_mb": peak_memory_mb(device),
    }


def summary(result: dict) -> list[str]:
    """The printed lines of a result of any mode."""
    r = result
    if r.get("mode") == "sampling":
        kind = r["sampler"] if not r.get("sde_type") else f"{r['sampler']} ({r['sde_type']})"
        window = f", SDE window {r['sde_window']}" if r.get("sde_window") else ""
        head = (f"sampling with log-probs on {r['model']} ({r['device']}, {r['dtype']}, {r['resolution']}px): "
                f"{kind} eta {r['eta']}{window}, {r['num_steps']} steps, CFG {r['guidance_scale']}, "
                f"batch {r['batch_size']}")
        return [head, f"  {r['trajectories_per_s']:.2f} trajectories/s"]
    if r.get("mode") == "online":
        rollout = (f"  rollout: {r['rollout_trajectories']} trajectories in {r['rollout_seconds']:.1f} s "
                   f"({r['trajectories_per_s']:.2f} trajectories/s, rewards and labels included)")
        return [f"method {r['method']} on {r['model']} ({r['device']}, {r['num_steps']} sampler steps, CFG {r['guidance_scale']})",
                rollout,
                f"  updates: {r['steps_per_s']:.3f} optimizer steps/s ({r['units_per_step']} units per step)"]
    if "prompts_per_s" in r:  # reward backprop
        head = (f"method {r['method']} on {r['model']} ({r['device']}, {r['num_steps']} sampler steps, "
                f"CFG {r['guidance_scale']}, {r['prompts_per_step']} prompts per step)")
        return [head,
                f"  {r['steps_per_s']:.3f} steps/s ({r['prompts_per_s']:.2f} prompts/s)"]
    unit = "pairs/s" if r["method"] in {"diffusion-dpo", "mapo"} else "examples/s"
    return [f"method {r['method']} on {r['model']} ({r['device']}, {r['resolution']}px, {r['batch_per_step']} per step)",
            f"  uncached (VAE + text encoders run): {r['pairs_per_s_uncached']:.2f} {unit}",
            f"  cached   (latents from the cache):  {r['pairs_per_s_cached']:.2f} {unit}",
            f"  compute floor (loss forward + backward alone): {r['pairs_per_s_floor']:.2f} {unit}; "
            f"the cached step takes {r['cached_over_floor']:.2f}x the floor"]


def _window_arg(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        start, end = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--sde-window must be START,END (two integers), not {text!r}") from None
    return start, end


def run(args: argparse.Namespace) -> int:
    from diffalign.trainers.registry import get_method, load_recipe

    recipe = load_recipe(None if args.recipe == "-" else args.recipe, list(args.overrides))
    kind = get_method(recipe.method["name"]).kind
    if args.sampling:
        result = bench_sampling(recipe, batches=args.steps, warmup=args.warmup, num_steps=args.num_steps,
                                batch_size=args.batch_size, eta=args.eta, guidance_scale=args.guidance_scale,
                                sde_type=args.sde_type, sde_window=_window_arg(args.sde_window))
    elif kind == "online":
        result = bench_online(recipe, steps=args.steps, warmup=args.warmup)
    elif kind == "backprop":
        result = bench_backprop(recipe, steps=args.steps, warmup=args.warmup)
    else:
        result = bench(recipe, steps=args.steps, warmup=args.warmup)
    print("\n".join(summary(result)))
    print(f"  peak memory: {result['peak_memory_mb']:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
