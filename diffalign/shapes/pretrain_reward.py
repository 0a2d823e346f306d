"""Train the bundled learned reward: a tiny CLIP on rendered (scene, caption) pairs, with hard negatives.

    python -m diffalign.shapes.pretrain_reward --out DIR [--steps N] [--seed S]

The loss is CLIP's symmetric InfoNCE over the batch, where each image's candidate captions also include
``num_negatives`` perturbations of its own caption (a wrong colour, count, shape or relation, or two
colours swapped between objects), so the model has to read composition, not only topic:

    L = CE(s(x_i, ·) over {c_j} ∪ {c̃_jk}, i) / 2 + CE(s(·, c_i) over {x_j}, i) / 2,
    s(x, c) = exp(logit_scale) * cos(f(x), g(c))           (the PickScore convention)
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from diffalign.shapes.pretrain import config_from_flags, new_output_dir, render_pool
from diffalign.shapes.tokenizer import build_tokenizer

COUNT_WORDS = ("two", "three", "four", "five")
RELATIONS = {"left": "right", "right": "left", "above": "below", "below": "above"}


@dataclass
class RewardConfig:
    """Knobs of the reward's training (defaults = the bundled run).

    Attributes:
        out: output folder (``CLIPModel`` + ``CLIPProcessor``, safetensors).
        seed: seeds rendering, initialisation and batches.
        num_scenes: rendered training pool, from train-split prompts.
        steps, batch_size, lr: AdamW, cosine decay after 5% warm-up.
        num_negatives: perturbed captions per image in each batch.
        eval_per_task: held-out prompts per task for the pick-the-true-caption accuracy.
        threads: ``torch.set_num_threads``.
    """

    out: str = "runs/shapes-clip-reward"
    seed: int = 0
    num_scenes: int = 8000
    steps: int = 800
    batch_size: int = 64
    lr: float = 1e-3
    num_negatives: int = 3
    eval_per_task: int = 30
    threads: int = 1


def make_clip(tokenizer) -> CLIPModel:
    """A CLIP of width 64: 2-layer text tower over the Shapes vocabulary, 4-layer ViT with 8x8 patches on 64x64."""
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=64, patch_size=8, hidden_size=96, intermediate_size=384, num_hidden_layers=4,
                           num_attention_heads=4),
        projection_dim=64,
    )
    return CLIPModel(config)


def make_processor(tokenizer) -> CLIPProcessor:
    """64x64 RGB, scaled to [-1, 1] (mean = std = 0.5), with the Shapes tokenizer."""
    images = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64},
                                image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def perturb_caption(text: str, rng: random.Random) -> str:
    """A caption that (almost surely) no longer describes the scene: one colour, count, shape or relation changed,
    or the colours of two objects swapped. Returns ``text`` unchanged only if it has nothing to perturb."""
    from diffalign.shapes.scene import COLORS, SHAPES

    words = text.split()
    colours = [i for i, w in enumerate(words) if w in COLORS]
    shapes = [i for i, w in enumerate(words) if w.rstrip("s") in SHAPES]
    counts = [i for i, w in enumerate(words) if w in COUNT_WORDS]
    relations = [i for i, w in enumerate(words) if w in RELATIONS]
    edits = []
    if colours:
        edits.append("colour")
    if len({words[i] for i in colours}) >= 2:
        edits += ["swap", "swap"]
    if shapes:
        edits.append("shape")
    if counts:
        edits += ["count", "count"]
    if relations:
        edits += ["relation", "relation"]
    if not edits:
        return text
    edit = rng.choice(edits)
    if edit == "colour":
        i = rng.choice(colours)
        words[i] = rng.choice([c for c in COLORS if c != words[i]])
    elif edit == "swap":
        i, j = rng.sample(colours, 2)
        while words[i] == words[j]:
            i, j = rng.sample(colours, 2)
        words[i], words[j] = words[j], words[i]
    elif edit == "shape":
        i = rng.choice(shapes)
        plural = words[i].endswith("s") and words[i].rstrip("s") in SHAPES and words[i] not in SHAPES
        new = rng.choice([s for s in SHAPES if s != words[i].rstrip("s")])
        words[i] = new + ("s" if plural else "")
    elif edit == "count":
        i = rng.choice(counts)
        words[i] = rng.choice([c for c in COUNT_WORDS[:3] if c != words[i]])
    else:
        i = rng.choice(relations)
        words[i] = RELATIONS[words[i]]
    return " ".join(words)


def _tensor(features) -> torch.Tensor:
    """transformers < 5 returns the projected features, >= 5 an output whose ``pooler_output`` they are."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def scores(model: CLIPModel, pixel_values: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """[n_images, n_texts] matrix of ``logit_scale.exp() * cos(image, text)``."""
    img = F.normalize(_tensor(model.get_image_features(pixel_values=pixel_values)), dim=-1)
    txt = F.normalize(_tensor(model.get_text_features(input_ids=input_ids)), dim=-1)
    return model.logit_scale.exp() * img @ txt.T


def _pixels(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0  # same as the processor: rescale 1/255, normalise mean=std=0.5


@torch.no_grad()
def caption_accuracy(model: CLIPModel, tokenizer, per_task: int, num_negatives: int = 4, seed: int = 0,
                     split: str = "heldout") -> dict[str, float]:
    """How often the true caption outscores all ``num_negatives`` perturbations of it, per task and overall."""
    import numpy as np

    from diffalign.shapes.grammar import prompt_set, scene_for_prompt
    from diffalign.shapes.scene import render

    rng = random.Random(seed)
    hits: dict[str, list[bool]] = {}
    for p in prompt_set(split, n_per_task=per_task, seed=seed):
        x = torch.from_numpy(np.asarray(render(scene_for_prompt(p, rng)).convert("RGB"))).permute(2, 0, 1)[None]
        negs = [n for n in {perturb_caption(p.text, rng) for _ in range(4 * num_negatives)} if n != p.text]
        ids = tokenizer([p.text] + negs[:num_negatives], padding="max_length", truncation=True,
                        return_tensors="pt").input_ids
        s = scores(model, _pixels(x), ids)[0]
        hits.setdefault(p.task, []).append(bool(len(s) > 1 and s[0] > s[1:].max()))
    out = {t: sum(h) / len(h) for t, h in hits.items()}
    out["overall"] = sum(sum(h) for h in hits.values()) / sum(len(h) for h in hits.values())
    return out


def train_reward(cfg: RewardConfig) -> Path:
    """Render the pool, train, measure held-out caption accuracy, save model + processor to ``cfg.out``."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen, rng = torch.Generator().manual_seed(cfg.seed), random.Random(cfg.seed)
    out = new_output_dir(cfg.out)
    start = time.time()
    tokenizer = build_tokenizer(out)
    captions, images = render_pool(cfg.num_scenes, cfg.seed + 1)
    model = make_clip(tokenizer)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + torch.cos(
        torch.tensor(torch.pi * s / cfg.steps)).item())))
    bar = tqdm(range(cfg.steps), desc="reward: clip", mininterval=10)
    for _ in bar:
        idx = torch.randint(len(captions), (cfg.batch_size,), generator=gen).tolist()
        texts = [captions[i] for i in idx]
        texts += [perturb_caption(captions[i], rng) for i in idx for _ in range(cfg.num_negatives)]
        ids = tokenizer(texts, padding="max_length", truncation=True, return_tensors="pt").input_ids
        s = scores(model, _pixels(images[idx]), ids)
        target = torch.arange(cfg.batch_size)
        # an image's own perturbations can coincide with its caption (nothing to perturb): mask those out
        same = torch.tensor([[texts[j] == texts[i] and j != i for j in range(len(texts))] for i in range(cfg.batch_size)])
        loss = 0.5 * F.cross_entropy(s.masked_fill(same, -1e4), target) + 0.5 * F.cross_entropy(
            s[:, : cfg.batch_size].T.masked_fill(same[:, : cfg.batch_size].T, -1e4), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap at 100
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    report = {"config": asdict(cfg), "train_s": time.time() - start}
    if cfg.eval_per_task:
        report["caption_accuracy_vs_4_perturbed"] = caption_accuracy(model, tokenizer, cfg.eval_per_task, seed=cfg.seed)
        print(json.dumps(report["caption_accuracy_vs_4_perturbed"]), flush=True)
    model.save_pretrained(out, safe_serialization=True)
    make_processor(tokenizer).save_pretrained(out)
    (out.parent / f"{out.name}-report.json").write_text(json.dumps(report, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: every :class:`RewardConfig` field is a ``--flag`` (underscores as dashes)."""
    cfg = config_from_flags(RewardConfig, "diffalign shapes pretrain-reward", __doc__.split("\n\n")[0], argv)
    print(f"saved {train_reward(cfg)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
