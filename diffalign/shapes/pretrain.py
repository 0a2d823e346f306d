"""Pretrain the bundled Shapes base model from scratch on rendered scenes, on a CPU.

    python -m diffalign.shapes.pretrain --out DIR [--steps N] [--vae-steps N] [--seed S]

Stage A trains the VAE (L1 + L2 reconstruction + a small KL) on rendered scenes and sets its latent
``scaling_factor`` to 1/std of the latents. Stage B trains the UNet and the text encoder jointly with
the epsilon-prediction loss of Stable Diffusion,

    L = E_{x, c, eps, t} || eps - eps_theta(sqrt(abar_t) z + sqrt(1 - abar_t) eps, t, tau(c)) ||^2,

on latents of scenes rendered from train-split captions, with 10% of captions dropped (empty
prompt) so classifier-free guidance works. The learning rate is constant after warm-up, so a run
to N steps is a prefix of any longer run: ``--snapshot-every`` saves the prefixes for picking.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from diffalign.shapes.model import (
    DEFAULT_SAMPLING,
    assemble_pipeline,
    make_text_encoder,
    make_train_scheduler,
    make_unet,
    make_vae,
)
from diffalign.shapes.tokenizer import build_tokenizer


@dataclass
class PretrainConfig:
    """Every knob of the base-model pretraining (defaults = the bundled model's run).

    Attributes:
        out: output folder; the pipeline is written there with ``save_pretrained`` (safetensors).
        seed: seeds data rendering, initialisation and noise.
        num_scenes: size of the rendered (caption, scene) pool, from train-split prompts.
        vae_steps, vae_batch_size, vae_lr, kl_weight: stage A.
        steps, batch_size, lr, warmup_steps: stage B (UNet + text encoder, AdamW, constant lr after warm-up).
        caption_dropout: fraction of captions replaced by "" in stage B (for classifier-free guidance).
        snapshot_every: if > 0, also save UNet + text encoder every this many stage-B steps.
        eval_per_task: if > 0, measure ShapesEval on this many held-out prompts per task at the end.
        threads: ``torch.set_num_threads``.
    """

    out: str = "runs/shapes-sd-base"
    seed: int = 0
    num_scenes: int = 24000
    vae_steps: int = 1000
    vae_batch_size: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    steps: int = 250
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    snapshot_every: int = 0
    eval_per_task: int = 0
    threads: int = 2


# ---------------------------------------------------------------- data

def render_pool(n: int, seed: int, split: str = "train") -> tuple[list[str], torch.Tensor]:
    """``n`` captions of the grammar and a scene satisfying each, rendered: (captions, uint8 [n, 3, 64, 64])."""
    from diffalign.shapes.grammar import sample_prompt, scene_for_prompt
    from diffalign.shapes.scene import render

    rng = random.Random(seed)
    captions, images = [], np.empty((n, 64, 64, 3), dtype=np.uint8)
    for i in tqdm(range(n), desc="render scenes", mininterval=5):
        prompt = sample_prompt(rng, split=split)
        captions.append(prompt.text)
        images[i] = np.asarray(render(scene_for_prompt(prompt, rng)).convert("RGB"))
    return captions, torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (the VAE's input range)."""
    return images.float() / 127.5 - 1.0


# ---------------------------------------------------------------- stage A: VAE

def train_vae(cfg: PretrainConfig, images: torch.Tensor, gen: torch.Generator):
    """Reconstruction (L1 + L2) plus ``kl_weight`` * KL to N(0, I); returns the VAE with its scaling factor set."""
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.vae_lr, total_steps=cfg.vae_steps, pct_start=0.05)
    bar = tqdm(range(cfg.vae_steps), desc="stage A: vae", mininterval=10)
    for _ in bar:
        x = to_model_range(images[torch.randint(len(images), (cfg.vae_batch_size,), generator=gen)])
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)).sample
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + cfg.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(rec=f"{rec.item():.4f}", refresh=False)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([vae.encode(to_model_range(images[i:i + 256])).latent_dist.mean for i in range(0, 2048, 256)])
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    return vae


@torch.no_grad()
def encode_pool(vae, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (sampled per step in stage B, as SD training does)."""
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="encode latents", mininterval=10):
        dist = vae.encode(to_model_range(images[i:i + batch_size])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


# ---------------------------------------------------------------- stage B: UNet + text encoder

def train_denoiser(cfg: PretrainConfig, tokenizer, captions: list[str], means: torch.Tensor, stds: torch.Tensor,
                   scaling_factor: float, gen: torch.Generator, on_snapshot=None):
    """Joint epsilon-prediction training of UNet and text encoder; returns (text_encoder, unet).

    ``on_snapshot(step, text_encoder, unet)`` is called every ``cfg.snapshot_every`` steps (if set).
    """
    text_encoder, unet, noise_sched = make_text_encoder(tokenizer), make_unet(), make_train_scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", return_tensors="pt").input_ids
    abar = noise_sched.alphas_cumprod
    bar = tqdm(range(1, cfg.steps + 1), desc="stage B: unet + text", mininterval=10)
    for step in bar:
        idx = torch.randint(len(captions), (cfg.batch_size,), generator=gen)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling_factor
        cond = ids[idx].clone()
        cond[torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout] = empty[0]
        eps = torch.randn(z0.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        pred = unet(zt, t, text_encoder(cond)[0]).sample
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if on_snapshot is not None and cfg.snapshot_every and step % cfg.snapshot_every == 0 and step < cfg.steps:
            on_snapshot(step, text_encoder, unet)
    return text_encoder.eval(), unet.eval()


# ---------------------------------------------------------------- evaluation

def evaluate_pipeline(pipe, per_task: int, seeds_per_prompt: int = 1, split: str = "heldout", seed: int = 0,
                      **sampling) -> dict:
    """ShapesEval (per task and overall) of ``pipe`` on ``prompt_set(split, per_task)`` with fixed seeds."""
    from diffalign.eval.generate import generate
    from diffalign.shapes.evaluate import shapes_eval
    from diffalign.shapes.grammar import prompt_set

    kwargs = {**DEFAULT_SAMPLING, **sampling}
    prompts = [p for p in prompt_set(split, n_per_task=per_task, seed=seed) for _ in range(seeds_per_prompt)]
    seeds = [1000 * seed + i for i in range(len(prompts))]
    images = generate(pipe, [p.text for p in prompts], seeds, **kwargs)
    return shapes_eval(images, prompts)


def evaluate_vae(vae, per_task: int, seed: int = 0, split: str = "heldout") -> dict[str, dict]:
    """ShapesEval on clean renders of ground-truth scenes and on their VAE reconstructions."""
    from PIL import Image

    from diffalign.shapes.evaluate import shapes_eval
    from diffalign.shapes.grammar import prompt_set, scene_for_prompt
    from diffalign.shapes.scene import render

    rng = random.Random(seed)
    prompts = prompt_set(split, n_per_task=per_task, seed=seed)
    clean = [render(scene_for_prompt(p, rng)).convert("RGB") for p in prompts]
    x = torch.from_numpy(np.stack([np.asarray(im) for im in clean])).permute(0, 3, 1, 2)
    with torch.no_grad():
        recon = vae.decode(vae.encode(to_model_range(x)).latent_dist.mean).sample
    recon = ((recon.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return {"clean": shapes_eval(clean, prompts), "vae_reconstruction": shapes_eval([Image.fromarray(r) for r in recon], prompts)}


# ---------------------------------------------------------------- entry points

def pretrain(cfg: PretrainConfig) -> Path:
    """Run stages A and B and save the pipeline to ``cfg.out``; returns that folder."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = new_output_dir(cfg.out)
    times, report = {}, {"config": asdict(cfg)}

    start = time.time()
    tokenizer = build_tokenizer(out / "tokenizer")
    captions, images = render_pool(cfg.num_scenes, cfg.seed)
    times["render_s"] = time.time() - start

    start = time.time()
    vae = train_vae(cfg, images, gen)
    times["vae_s"] = time.time() - start
    if cfg.eval_per_task:
        report["vae_eval"] = evaluate_vae(vae, cfg.eval_per_task, seed=cfg.seed)
        print(json.dumps(report["vae_eval"]), flush=True)

    start = time.time()
    means, stds = encode_pool(vae, images)
    def snapshot(step: int, text_encoder, unet) -> None:  # a full pipeline: any prefix of the run can be picked
        folder = out.parent / f"{out.name}-snapshots" / f"step-{step}"
        assemble_pipeline(vae, text_encoder, tokenizer, unet).save_pretrained(folder, safe_serialization=True)
        for name in ("vocab.json", "merges.txt"):  # the BPE files too, for tokenizers without tokenizer.json
            shutil.copy(out / "tokenizer" / name, folder / "tokenizer" / name)

    text_encoder, unet = train_denoiser(cfg, tokenizer, captions, means, stds, vae.config.scaling_factor, gen,
                                        on_snapshot=snapshot)
    times["denoiser_s"] = time.time() - start

    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet)
    pipe.save_pretrained(out, safe_serialization=True)
    if cfg.eval_per_task:
        pipe.set_progress_bar_config(disable=True)
        report["shapes_eval"] = evaluate_pipeline(pipe, cfg.eval_per_task, seed=cfg.seed)
        print(json.dumps(report["shapes_eval"]), flush=True)
    report["times"] = times
    (out.parent / f"{out.name}-report.json").write_text(json.dumps(report, indent=2))
    return out


def new_output_dir(path: str | Path, create: bool = True) -> Path:
    """``path`` as a new, empty output folder (created unless ``create=False``); an existing non-empty folder
    is refused, so that a pretraining run never overwrites an earlier one's model."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out (nothing was overwritten)")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def config_from_flags(config_cls, prog: str, description: str, argv: list[str] | None):
    """``config_cls`` (a dataclass of str / int / float fields) from command-line flags: every field is a
    ``--flag`` (underscores as dashes) with its default. The Shapes pretraining tools' command line."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in fields(config_cls):
        if type(f.default) not in (str, int, float):
            raise TypeError(f"{config_cls.__name__}.{f.name}: only str, int and float fields become flags")
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    return config_cls(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    """CLI: every :class:`PretrainConfig` field is a ``--flag`` (underscores as dashes)."""
    cfg = config_from_flags(PretrainConfig, "diffalign shapes pretrain", __doc__.split("\n\n")[0], argv)
    print(f"saved {pretrain(cfg)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
