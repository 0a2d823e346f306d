"""Pretrain the bundled flow-matching Shapes base (SD3 architecture) from scratch, on a CPU.

    python -m diffalign.shapes.pretrain_flow --out DIR [--steps N] [--seed S]

It shares the Shapes SD base's VAE (loaded from ``--vae``, frozen) and tokenizer, re-centres the latents
with the VAE's ``shift_factor`` (their mean) and ``scaling_factor`` (1/their std) as SD3 does, and trains
the two CLIP text encoders and the MMDiT transformer jointly with the rectified-flow loss of SD3,

    x_sigma = (1 - sigma) z_0 + sigma eps,    L = E || (eps - z_0) - v_theta(x_sigma, 1000 sigma, c) ||^2,

(:class:`~diffalign.core.forward.FlowMatchingForward`, the process the flow methods train with) with
``sigma`` drawn logit-normal (``sigmoid(N(0, 1))``, SD3's default; no shift, as the saved scheduler) and
10% of captions dropped (the empty prompt) so classifier-free guidance works. The text conditioning is the pipeline's own
``encode_prompt`` (penultimate CLIP states of both encoders, concatenated, then the zero tokens the
pipeline puts where T5 would be), so the trained model is sampled by a plain ``StableDiffusion3Pipeline``
with its defaults. The learning rate is constant after warm-up, so a run to N steps is a prefix of any
longer run; ``--snapshot-every`` saves the prefixes for picking.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from diffalign.core.forward import FlowMatchingForward
from diffalign.shapes.model import (
    FLOW_DEFAULT_SAMPLING,
    assemble_flow_pipeline,
    base_model_path,
    make_flow_text_encoder,
    make_flow_transformer,
)
from diffalign.shapes.pretrain import config_from_flags, encode_pool, evaluate_pipeline, new_output_dir, render_pool
from diffalign.shapes.tokenizer import build_tokenizer

T5_TOKENS = 256
"""The zero tokens ``StableDiffusion3Pipeline`` appends where T5 would be (its ``max_sequence_length``
default): the model is trained with them, so the pipeline's defaults sample it."""


@dataclass
class FlowPretrainConfig:
    """Every knob of the flow-base pretraining (defaults = the bundled model's run).

    Attributes:
        out: output folder; the pipeline is written there with ``save_pretrained`` (safetensors).
        vae: a diffusers pipeline folder whose ``vae`` is reused (frozen); default the bundled SD base's.
        seed: seeds data rendering, initialisation and noise.
        num_scenes: size of the rendered (caption, scene) pool, from train-split prompts.
        steps, batch_size, lr, warmup_steps, weight_decay: AdamW on transformer + both text encoders,
            constant lr after warm-up.
        caption_dropout: fraction of captions replaced by "" (for classifier-free guidance).
        logit_mean, logit_std: the logit-normal density of the training sigmas.
        snapshot_every: if > 0, also save the pipeline every this many steps.
        eval_per_task: if > 0, measure ShapesEval on this many held-out prompts per task at the end.
        threads: ``torch.set_num_threads``.
    """

    out: str = "runs/shapes-sd3-base"
    vae: str = ""
    seed: int = 0
    num_scenes: int = 24000
    steps: int = 1500
    batch_size: int = 32
    lr: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 1e-2
    caption_dropout: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    snapshot_every: int = 0
    eval_per_task: int = 0
    threads: int = 2


def load_shared_vae(folder: str | Path, means: torch.Tensor | None = None) -> AutoencoderKL:
    """The frozen VAE of ``folder`` (a pipeline folder), with SD3's latent normalisation set from ``means``
    (posterior means ``[N, 4, 16, 16]``): ``shift_factor`` = their mean, ``scaling_factor`` = 1/their std."""
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval().requires_grad_(False)
    if means is not None:
        shift = float(means.mean())
        vae.register_to_config(shift_factor=shift, scaling_factor=float(1.0 / (means - shift).std()))
    return vae


def train_flow_denoiser(cfg: FlowPretrainConfig, pipe, captions: list[str], means: torch.Tensor,
                        stds: torch.Tensor, gen: torch.Generator, on_snapshot=None):
    """Joint rectified-flow training of ``pipe``'s transformer and two text encoders (in place).

    ``means``/``stds``: posterior moments of the pool's latents ``[N, 4, 16, 16]`` (a latent is sampled
    per step, as SD training does). ``on_snapshot(step)`` is called every ``cfg.snapshot_every`` steps."""
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    for m in modules:
        m.train()
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps))
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    process = FlowMatchingForward(shift=float(pipe.scheduler.config.shift), timestep_sampling="logit_normal",
                                  logit_mean=cfg.logit_mean, logit_std=cfg.logit_std)
    bar = tqdm(range(1, cfg.steps + 1), desc="flow base: transformer + text", mininterval=10)
    for step in bar:
        idx = torch.randint(len(captions), (cfg.batch_size,), generator=gen)
        z0 = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen) - shift) * scale
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.caption_dropout
        prompts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS)
        eps = torch.randn(z0.shape, generator=gen)
        t = process.sample_timesteps(cfg.batch_size, generator=gen)  # 1000·σ
        v = pipe.transformer(hidden_states=process.add_noise(z0, eps, t), timestep=t, encoder_hidden_states=embeds,
                             pooled_projections=pooled, return_dict=False)[0]
        loss = F.mse_loss(v, process.target(z0, eps, t))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if on_snapshot is not None and cfg.snapshot_every and step % cfg.snapshot_every == 0 and step < cfg.steps:
            on_snapshot(step)
    for m in modules:
        m.eval()
    return pipe


def pretrain_flow(cfg: FlowPretrainConfig) -> Path:
    """Render the pool, encode it with the shared VAE, train, save the pipeline to ``cfg.out``."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    out = new_output_dir(cfg.out)
    times, report = {}, {"config": asdict(cfg)}

    start = time.time()
    tokenizer = build_tokenizer(out / "tokenizer-build")
    captions, images = render_pool(cfg.num_scenes, cfg.seed)
    times["render_s"] = time.time() - start

    start = time.time()
    vae_folder = cfg.vae or base_model_path()
    means, stds = encode_pool(load_shared_vae(vae_folder), images)
    vae = load_shared_vae(vae_folder, means)
    times["encode_s"] = time.time() - start

    pipe = assemble_flow_pipeline(vae, make_flow_text_encoder(tokenizer), make_flow_text_encoder(tokenizer),
                                  tokenizer, make_flow_transformer())
    pipe.set_progress_bar_config(disable=True)

    def save(folder: Path) -> None:
        pipe.save_pretrained(folder, safe_serialization=True)
        for sub in ("tokenizer", "tokenizer_2"):  # the BPE files too, for tokenizers without tokenizer.json
            for name in ("vocab.json", "merges.txt"):
                shutil.copy(out / "tokenizer-build" / name, folder / sub / name)

    start = time.time()
    train_flow_denoiser(cfg, pipe, captions, means, stds, gen,
                        on_snapshot=lambda step: save(out.parent / f"{out.name}-snapshots" / f"step-{step}"))
    times["denoiser_s"] = time.time() - start
    save(out)
    shutil.rmtree(out / "tokenizer-build")
    if cfg.eval_per_task:
        report["shapes_eval"] = evaluate_pipeline(pipe, cfg.eval_per_task, seed=cfg.seed, **FLOW_DEFAULT_SAMPLING)
        print(json.dumps(report["shapes_eval"]), flush=True)
    report["times"] = times
    (out.parent / f"{out.name}-report.json").write_text(json.dumps(report, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: every :class:`FlowPretrainConfig` field is a ``--flag`` (underscores as dashes)."""
    cfg = config_from_flags(FlowPretrainConfig, "diffalign shapes pretrain-flow", __doc__.split("\n\n")[0], argv)
    print(f"saved {pretrain_flow(cfg)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
