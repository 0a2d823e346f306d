"""Fine-tune the bundled Shapes CLIP on the oracle's preference pairs: the Shapes world's PickScore.

    python -m diffalign.shapes.pretrain_pickscore --out DIR [--steps N] [--seed S]

PickScore is CLIP fine-tuned on Pick-a-Pic's human choices; here the chooser is the oracle and the pairs
are the bundled candidates (each train-split prompt's oracle-best and oracle-worst base-model sample, as
the demo and the offline methods train on). For a caption ``c`` and its two images, the model's choice
``softmax(s(x_0, c), s(x_1, c))`` is fit to the oracle's noise-free preference by cross-entropy,

    L = -Σ_k q_k log softmax(s(x_0, c), s(x_1, c))_k,     s(x, c) = exp(logit_scale) · cos(f(x), g(c)),

with ``q = (1, 0)`` when image 0 is better by at least the oracle's tie margin, ``(0.5, 0.5)`` for a tie
(PickScore's target for Pick-a-Pic's ties). The first ``train_fraction`` of the prompts train; the rest
measure agreement (the share of non-tied pairs whose better image scores higher) before and after.
Unlike the contrastive Shapes CLIP, whose ranking of a base-sample pair is at chance, the result is a
differentiable reward that agrees with the oracle: the reward the reward-backprop methods (AlignProp,
DRaFT, ReFL) need on Shapes.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import CLIPModel

from diffalign.shapes.pretrain import config_from_flags, new_output_dir
from diffalign.shapes.pretrain_reward import _pixels, scores


@dataclass
class PickScoreConfig:
    """Knobs of the preference fine-tuning (defaults = the bundled run).

    Attributes:
        out: a new output folder (``CLIPModel`` + its processor, safetensors); an existing non-empty one is refused.
        init: the CLIP folder to start from (default: the bundled ``shapes-clip-reward``).
        candidates: the candidates parquet (default: the bundled ``datasets/shapes-candidates``).
        seed: seeds the batches.
        steps, batch_size, lr, weight_decay: AdamW at a constant lr.
        train_fraction: the first this share of the candidates' prompts train, the rest validate.
        tie_margin: utility differences below this are ties (the oracle's default).
        threads: ``torch.set_num_threads``.
    """

    out: str = "runs/shapes-pickscore"
    init: str = ""
    candidates: str = ""
    seed: int = 0
    steps: int = 250
    batch_size: int = 64
    lr: float = 1e-4
    weight_decay: float = 0.05
    train_fraction: float = 0.75
    tie_margin: float = 0.02
    threads: int = 1


def preference_pairs(utilities: torch.Tensor, tie_margin: float) -> torch.Tensor:
    """``[N, K]`` utilities (N prompts, K images each) -> ``[M, 4]`` rows ``(prompt, i, j, q_i)`` for every
    image pair ``i < j`` of a prompt: ``q_i`` is the target probability that image ``i`` is chosen
    (1 or 0, or 0.5 when the utilities differ by less than ``tie_margin``)."""
    rows = []
    for n, u in enumerate(utilities.tolist()):
        for i in range(len(u)):
            for j in range(i + 1, len(u)):
                d = u[i] - u[j]
                rows.append((n, i, j, 0.5 if abs(d) < tie_margin else float(d > 0)))
    return torch.tensor(rows, dtype=torch.float64)


def candidate_tensors(cands) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels [N, K, 3, 64, 64] uint8, utilities [N, K])`` of a :class:`~diffalign.shapes.demo.Candidates`
    whose prompts all have K images."""
    if len({len(g) for g in cands.images}) != 1:
        raise ValueError("every prompt of the candidates needs the same number of images")
    pixels = torch.stack([torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in g])
                          for g in cands.images])
    return pixels, torch.tensor(cands.utilities)


@torch.no_grad()
def image_scores(model: CLIPModel, pixels: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` scores of each prompt's K images (``pixels`` ``[N, K, 3, 64, 64]`` uint8) for its caption
    (``input_ids`` ``[N, L]``)."""
    return torch.stack([scores(model, _pixels(pixels[n]), input_ids[n : n + 1])[:, 0] for n in range(len(pixels))])


def agreement(model_scores: torch.Tensor, utilities: torch.Tensor, pairs: torch.Tensor) -> float:
    """Share of the non-tied ``pairs`` (rows of :func:`preference_pairs`) whose oracle-better image scores higher."""
    decided = pairs[pairs[:, 3] != 0.5]
    if not len(decided):
        return float("nan")
    n, i, j, q = (decided[:, k] for k in range(4))
    n, i, j = n.long(), i.long(), j.long()
    return float(((model_scores[n, i] > model_scores[n, j]).double() == q).double().mean())


def pair_loss(model: CLIPModel, pixels_i: torch.Tensor, pixels_j: torch.Tensor, input_ids: torch.Tensor,
              target_i: torch.Tensor) -> torch.Tensor:
    """PickScore's loss of a batch: images ``[B, 3, 64, 64]`` (uint8) of two sides, captions ``[B, L]``,
    ``target_i`` ``[B]`` the target probability of side i; the mean cross-entropy of the 2-way softmax."""
    img = F.normalize(_feature(model.get_image_features(pixel_values=_pixels(torch.cat([pixels_i, pixels_j])))), dim=-1)
    txt = F.normalize(_feature(model.get_text_features(input_ids=input_ids)), dim=-1)
    b = len(input_ids)
    logits = model.logit_scale.exp() * (img.view(2, b, -1) * txt[None]).sum(-1).T  # [B, 2]
    target = torch.stack([target_i, 1 - target_i], dim=1).to(logits.dtype)
    return -(target * logits.log_softmax(-1)).sum(-1).mean()


def _feature(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def train_pickscore(cfg: PickScoreConfig) -> Path:
    """Fine-tune, measure validation agreement, save model + processor to ``cfg.out`` and a report beside it."""
    from diffalign.shapes.demo import BUNDLED_CANDIDATES, Candidates
    from diffalign.shapes.model import reward_model_path

    out = new_output_dir(cfg.out, create=False)  # made when the model is saved: no half-written folder
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    start = time.time()
    init = Path(cfg.init) if cfg.init else reward_model_path()
    model = CLIPModel.from_pretrained(init, use_safetensors=True)
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(init)
    source = cfg.candidates or BUNDLED_CANDIDATES
    cands = Candidates.load(source)
    try:
        pixels, utilities = candidate_tensors(cands)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    ids = tokenizer([p.text for p in cands.prompts], padding="max_length", truncation=True,
                    return_tensors="pt").input_ids
    pairs = preference_pairs(utilities, cfg.tie_margin)
    n_train = int(round(cfg.train_fraction * len(cands.prompts)))
    train, val = pairs[pairs[:, 0] < n_train], pairs[pairs[:, 0] >= n_train]
    if not len(train):
        raise ValueError(f"no training pairs: {len(cands.prompts)} prompts, train_fraction {cfg.train_fraction}")
    model.eval()
    before = image_scores(model, pixels, ids)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    bar = tqdm(range(cfg.steps), desc="reward: shapes pickscore", mininterval=10)
    for _ in bar:
        batch = train[torch.randint(len(train), (min(cfg.batch_size, len(train)),), generator=gen)]
        n, i, j = (batch[:, k].long() for k in range(3))
        loss = pair_loss(model, pixels[n, i], pixels[n, j], ids[n], batch[:, 3])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap at 100
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    after = image_scores(model, pixels, ids)
    report = {"config": asdict(cfg), "train_s": round(time.time() - start, 1),
              "pairs": {"train": len(train), "val": len(val), "val_decided": int((val[:, 3] != 0.5).sum())},
              "agreement": {"train_before": agreement(before, utilities, train),
                            "train_after": agreement(after, utilities, train),
                            "val_before": agreement(before, utilities, val),
                            "val_after": agreement(after, utilities, val)}}
    print(json.dumps(report["agreement"]), flush=True)
    partial = out.parent / f".{out.name}.partial"  # written whole, then renamed: never a half-written model
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    model.save_pretrained(partial, safe_serialization=True)
    for f in init.iterdir():  # the processor and tokenizer files, unchanged
        if f.is_file() and f.suffix in (".json", ".txt") and f.name != "config.json":
            shutil.copy(f, partial / f.name)
    (partial / "reward.yaml").write_text("reward: shapes-pickscore\n")  # `method.reward=DIR` loads this folder
    partial.replace(out)
    (out.parent / f"{out.name}-report.json").write_text(json.dumps(report, indent=2))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: every :class:`PickScoreConfig` field is a ``--flag`` (underscores as dashes)."""
    cfg = config_from_flags(PickScoreConfig, "diffalign shapes pretrain-pickscore", __doc__.split("\n\n")[0], argv)
    print(f"saved {train_pickscore(cfg)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
