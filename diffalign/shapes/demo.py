"""`diffalign demo`: the whole pipeline on the bundled Shapes world, offline, on a CPU.

1. sample candidate images for each training prompt from the bundled base model (by default the
   bundled ``datasets/shapes-candidates``, which are exactly those samples, after re-sampling a
   spot check of them: sampling all 1,600 takes longer than the rest of the demo on 2 CPU cores);
2. pair each prompt's best and worst candidate and label the pair with the (noisy) oracle annotator
   (Pick-a-Pic v2 schema: ``jpg_0, jpg_1, label_0, caption``);
3. train MaPO with LoRA through the normal recipe (``pipelines/shapes-mapo.yaml``: the method that beat base
   at every training seed of the efficacy table, README; ``--recipe`` trains another, e.g.
   ``shapes-diffusion-dpo.yaml``);
4. evaluate base and aligned on held-out prompts with the same seeds: ShapesEval per task, the
   oracle's win rate of aligned over base (95% CI), the learned reward's mean;
5. write ``results.json`` and ``report.html``.

The same functions drive the efficacy tests (with a label-flipped control).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ACCEPTS_OVERRIDES = True  # recipe overrides, e.g. --train.max_steps=50

# the bundled recipe itself (pipelines/), not a file of that name in the working directory
RECIPE = Path(__file__).resolve().parents[1] / "pipelines" / "shapes-mapo.yaml"
BUNDLED_CANDIDATES = Path(__file__).resolve().parent / "assets" / "candidates" / "candidates.parquet"  # datasets/...
# the settings the bundled candidates were sampled with (`diffalign shapes candidates`, its defaults)
BUNDLED_SETTINGS = {"seed": 0, "images_per_prompt": 4, "sample_steps": 20, "guidance_scale": 5.0, "max_prompts": 400}


@dataclass
class DemoConfig:
    """Sizes of the demo; the defaults fit in a few minutes on 2 CPU cores."""

    output_dir: str = "runs/shapes-demo"
    recipe: str | None = None          # None = the bundled pipelines/shapes-mapo.yaml (or its packaged copy)
    train_prompts: int = 400
    images_per_prompt: int = 4         # the pair is the oracle's best and worst of these
    sample_steps: int = 20             # sampler steps for the training candidates
    eval_prompts_per_task: int = 12
    eval_seeds_per_prompt: int = 2
    num_inference_steps: int = 20
    guidance_scale: float = 5.0
    oracle_noise: float = 0.1
    flip_labels: bool = False          # the control: train on reversed preferences
    seed: int = 0
    candidates: str = "bundled"        # "bundled" (spot-checked), "sample" (all afresh) or a candidates parquet
    spot_check_prompts: int = 4        # bundled: prompts re-sampled to check the file is this model's samples
    overrides: list[str] = field(default_factory=list)


def load_base_pipeline(device: str = "cpu"):
    from diffusers import StableDiffusionPipeline

    from diffalign.shapes.model import base_model_path

    pipe = StableDiffusionPipeline.from_pretrained(base_model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@dataclass
class Candidates:
    """``images_per_prompt`` base-model samples for each training prompt, with their noise-free utilities.

    ``images[i]`` and ``utilities[i]`` hold prompt ``prompts[i]``'s samples. Sampled once, they give
    the labelled pairs of a run and of its flipped-label control, and the data of every offline method.
    """

    prompts: list
    images: list[list]
    utilities: list[list[float]]

    def extremes(self) -> Candidates:
        """Each prompt's best and worst candidate only (all that :func:`preference_rows` uses)."""
        images, utilities = [], []
        for group, utils in zip(self.images, self.utilities):
            order = sorted(range(len(group)), key=utils.__getitem__)
            keep = [order[-1], order[0]] if len(order) > 1 else order
            images.append([group[i] for i in keep])
            utilities.append([utils[i] for i in keep])
        return Candidates(list(self.prompts), images, utilities)

    def save(self, path: str | Path) -> Path:
        """Write a parquet (``caption``, ``jpg``: list of PNG bytes, ``utility``: list of floats), atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from diffalign.shapes.oracle import to_png_bytes as png

        from diffalign.data.files import atomic_write

        table = pa.table({"caption": [p.text for p in self.prompts],
                          "jpg": [[png(im) for im in g] for g in self.images],
                          "utility": self.utilities})
        return atomic_write(path, lambda tmp: pq.write_table(table, tmp))

    @classmethod
    def load(cls, path: str | Path) -> Candidates:
        """Read what :meth:`save` wrote."""
        import io

        import pyarrow.parquet as pq
        from PIL import Image

        from diffalign.shapes.grammar import parse_prompt

        t = pq.read_table(path).to_pydict()
        missing = {"caption", "jpg", "utility"} - set(t)
        if missing:
            raise ValueError(f"{path}: not a Shapes candidates file (missing column(s) {sorted(missing)})")
        images = [[Image.open(io.BytesIO(b)).convert("RGB") for b in g] for g in t["jpg"]]
        return cls([parse_prompt(c) for c in t["caption"]], images, [list(map(float, u)) for u in t["utility"]])


def sample_candidates(pipe, prompts, *, images_per_prompt: int, seed: int, num_inference_steps: int = 20,
                      guidance_scale: float = 5.0, progress: str | None = "sample candidates") -> Candidates:
    """Sample ``images_per_prompt`` images per prompt (seed ``seed·1000003 + index``) and score them with
    the noise-free oracle."""
    from diffalign.eval.generate import generate
    from diffalign.shapes.oracle import Oracle

    k = images_per_prompt
    texts = [p.text for p in prompts for _ in range(k)]
    seeds = [seed * 1_000_003 + i for i in range(len(texts))]
    imgs = generate(pipe, texts, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                    progress=progress)
    judge = Oracle(noise=0.0)
    groups = [imgs[i * k:(i + 1) * k] for i in range(len(prompts))]
    return Candidates(list(prompts), groups, [[judge.utility(im, p) for im in g] for g, p in zip(groups, prompts)])


def preference_rows(candidates: Candidates, oracle, *, flip: bool = False) -> list[dict]:
    """One Pick-a-Pic row per prompt: its best and worst candidate (by noise-free utility, as on-line DPO
    recipes pair max/min reward samples), in alternating order, labelled by ``oracle`` (noise, ties).

    ``flip`` reverses every label (the control run). Rows: ``caption, jpg_0, jpg_1, label_0``, the images
    as lossless PNG bytes (:func:`~diffalign.shapes.oracle.to_png_bytes`): the pixels the oracle scored.
    """
    from diffalign.shapes.oracle import to_png_bytes

    rows = []
    for i, (prompt, group, utils) in enumerate(zip(candidates.prompts, candidates.images, candidates.utilities)):
        order = sorted(range(len(group)), key=utils.__getitem__)
        a, b = (order[-1], order[0]) if i % 2 == 0 else (order[0], order[-1])
        label = oracle.label_from_utilities(utils[a], utils[b])
        rows.append({"caption": prompt.text, "jpg_0": to_png_bytes(group[a]), "jpg_1": to_png_bytes(group[b]),
                     "label_0": 1.0 - label if flip else label})
    return rows


def write_feedback_data(candidates: Candidates, oracle, out_dir: Path, *, flip: bool = False) -> Path:
    """Per-image feedback for KTO on every candidate: ``out_dir/feedback.jsonl`` (``prompt, image,
    label``; data.format ``feedback``) with the images as PNG files beside it. An image is liked when its
    noise-free utility is above the median of all candidates (:meth:`~diffalign.shapes.oracle.Oracle.
    like_from_utility`, with the oracle's label noise); ``flip`` reverses every label (the control)."""
    import json

    import numpy as np

    threshold = float(np.median([u for utils in candidates.utilities for u in utils]))
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (prompt, group, utils) in enumerate(zip(candidates.prompts, candidates.images, candidates.utilities)):
        for j, (image, utility) in enumerate(zip(group, utils)):
            name = f"images/{i:04d}_{j}.png"
            image.save(out_dir / name)
            like = oracle.like_from_utility(utility, threshold)
            lines.append(json.dumps({"prompt": prompt.text, "image": name, "label": like != flip}))
    path = out_dir / "feedback.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_preference_data(rows: list[dict], out_path: Path) -> dict:
    """Write ``rows`` as a Pick-a-Pic v2 parquet; returns the label counts."""
    from diffalign.data.pickapic import write_pickapic_parquet

    write_pickapic_parquet(rows, out_path)
    labels = [r["label_0"] for r in rows]
    return {"pairs": len(rows), "label_0=1": labels.count(1.0), "label_0=0": labels.count(0.0), "ties": labels.count(0.5)}


def heldout_eval_set(n_per_task: int, seeds_per_prompt: int, seed: int = 1) -> tuple[list, list[int]]:
    """The held-out evaluation set: ``(prompts, seeds)`` with each prompt repeated ``seeds_per_prompt`` times
    and a fixed seed per image (``1234 + index``), the same for every model compared."""
    from diffalign.shapes.grammar import prompt_set

    prompts = [p for p in prompt_set("heldout", n_per_task=n_per_task, seed=seed) for _ in range(seeds_per_prompt)]
    return prompts, [1234 + i for i in range(len(prompts))]


def compare_images(base_imgs, aligned_imgs, prompts) -> dict:
    """ShapesEval per task of both, the oracle's win rate of aligned over base (paired bootstrap CI over
    prompts), the mean oracle utility of both, and the learned reward's mean where available; ``per_image``
    (each image's ShapesEval verdict, oracle utility, learned reward) and ``deltas`` (aligned − base of every
    summary row, with its 95% bootstrap interval over prompts, :func:`~diffalign.eval.compare.paired_comparison`)."""
    from diffalign.eval.compare import paired_comparison
    from diffalign.shapes.evaluate import evaluate, shapes_eval
    from diffalign.shapes.oracle import Oracle

    judge = Oracle(noise=0.0)
    rate, lo, hi = judge.win_rate(aligned_imgs, base_imgs, prompts)
    per_image = {name: {"correct": [float(evaluate(im, p).correct) for im, p in zip(imgs, prompts)],
                        "utility": [float(judge.utility(im, p)) for im, p in zip(imgs, prompts)]}
                 for name, imgs in (("base", base_imgs), ("aligned", aligned_imgs))}
    out = {
        "n_images": len(prompts),
        "shapes_eval": {"base": shapes_eval(base_imgs, prompts), "aligned": shapes_eval(aligned_imgs, prompts)},
        "oracle_win_rate": {"aligned_over_base": rate, "ci95": [lo, hi]},
        "oracle_utility": {k: float(sum(v["utility"]) / len(prompts)) for k, v in per_image.items()},
    }
    texts = [p.text for p in prompts]
    try:
        from diffalign.rewards import load_reward

        reward = load_reward("shapes-clip")
        for name, imgs in (("base", base_imgs), ("aligned", aligned_imgs)):
            per_image[name]["learned_reward"] = [float(v) for v in reward.score(imgs, texts).detach().cpu()]
        out["learned_reward"] = {k: float(sum(v["learned_reward"]) / len(prompts)) for k, v in per_image.items()}
    except (ImportError, KeyError, FileNotFoundError, ValueError) as e:  # reward not available in this build
        out["learned_reward"] = {"error": str(e)}

    def delta(key: str, idx: list[int]) -> dict:
        c = paired_comparison([per_image["aligned"][key][i] for i in idx], [per_image["base"][key][i] for i in idx],
                              groups=[texts[i] for i in idx])
        return {k: c[k] for k in ("mean_diff", "diff_ci95", "n", "n_prompts")}

    everything = list(range(len(prompts)))
    deltas = {f"ShapesEval {t}": delta("correct", [i for i, p in enumerate(prompts) if p.task == t])
              for t in out["shapes_eval"]["base"] if t != "overall"}
    deltas["ShapesEval overall"] = delta("correct", everything)
    deltas["oracle utility (mean)"] = delta("utility", everything)
    if "learned_reward" in per_image["base"]:
        deltas["learned reward (shapes-clip)"] = delta("learned_reward", everything)
    out["deltas"], out["per_image"] = deltas, per_image
    return out


def bundled_candidates_match(cfg: DemoConfig) -> bool:
    """Whether ``cfg`` asks for candidates the bundled file holds (same seed, samples, steps, guidance; at
    most its 400 prompts: prompts and seeds are drawn in order, so fewer prompts are a prefix)."""
    b = BUNDLED_SETTINGS
    return (BUNDLED_CANDIDATES.is_file() and cfg.seed == b["seed"] and cfg.images_per_prompt == b["images_per_prompt"]
            and cfg.sample_steps == b["sample_steps"] and cfg.guidance_scale == b["guidance_scale"]
            and cfg.train_prompts <= b["max_prompts"])


def spot_check(pipe, prompts, stored: Candidates, cfg: DemoConfig) -> bool:
    """Re-sample the first ``cfg.spot_check_prompts`` prompts and compare them with ``stored`` (best and
    worst images within 2 of 255 per pixel, utilities within 0.02: CPU numerics differ in the last bits)."""
    import numpy as np

    n = min(cfg.spot_check_prompts, len(prompts))
    if n == 0:
        return True
    if [p.text for p in prompts[:n]] != [p.text for p in stored.prompts[:n]]:
        return False
    fresh = sample_candidates(pipe, prompts[:n], images_per_prompt=cfg.images_per_prompt, seed=cfg.seed,
                              num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                              progress="spot check").extremes()
    same_images = all(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 2
                      for got, want in zip(fresh.images, stored.images[:n]) for a, b in zip(got, want))
    return same_images and bool(np.allclose(fresh.utilities, stored.utilities[:n], atol=0.02))


def training_candidates(pipe, prompts, cfg: DemoConfig) -> tuple[Candidates, str]:
    """The training candidates of ``prompts`` and where they came from (``cfg.candidates``): the bundled
    ones when they are these samples (spot-checked; else sampled afresh), all sampled, or a given file."""
    if cfg.candidates not in ("bundled", "sample"):
        stored = Candidates.load(cfg.candidates)
        if [p.text for p in stored.prompts[:len(prompts)]] != [p.text for p in prompts]:
            raise ValueError(f"{cfg.candidates} holds other prompts than the demo's {len(prompts)} training prompts "
                             f"(seed {cfg.seed}); make it with `diffalign shapes candidates`")
        return _first(stored, len(prompts)), str(cfg.candidates)
    if cfg.candidates == "bundled" and bundled_candidates_match(cfg):
        stored = Candidates.load(BUNDLED_CANDIDATES)
        if spot_check(pipe, prompts, stored, cfg):
            print("candidates: the bundled base-model samples (shapes-candidates; "
                  f"{min(cfg.spot_check_prompts, len(prompts))} prompts re-sampled and matched); "
                  "--candidates sample samples all of them again")
            return _first(stored, len(prompts)), "bundled (spot-checked)"
        print("candidates: the bundled samples do not match this base model; sampling them all")
    return sample_candidates(pipe, prompts, images_per_prompt=cfg.images_per_prompt, seed=cfg.seed,
                             num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale), "sampled"


def _first(c: Candidates, n: int) -> Candidates:
    return Candidates(list(c.prompts[:n]), c.images[:n], c.utilities[:n])


def run_demo(cfg: DemoConfig) -> dict:
    from diffalign.shapes.grammar import sample_prompt
    from diffalign.shapes.oracle import Oracle
    from diffalign.trainers.registry import load_recipe, run_recipe

    t_start = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    base = load_base_pipeline()

    # 1–2. preference pairs from the base model, labelled by the oracle
    train_prompts = [sample_prompt(rng, split="train") for _ in range(cfg.train_prompts)]
    candidates, candidates_source = training_candidates(base, train_prompts, cfg)
    data_path = out / "data" / "train.parquet"
    rows = preference_rows(candidates, Oracle(noise=cfg.oracle_noise, seed=cfg.seed), flip=cfg.flip_labels)
    label_counts = write_preference_data(rows, data_path)

    # 3. the recipe's method (MaPO by default) with LoRA, through the normal recipe
    recipe = load_recipe(cfg.recipe or RECIPE, [
        f"data.source={data_path}", f"train.output_dir={out / 'train'}", f"train.seed={cfg.seed}",
        "train.overwrite=true", *cfg.overrides])  # the demo's own rerun replaces its training run
    run_dir = run_recipe(recipe)

    # 4. base vs aligned on held-out prompts, same seeds
    from diffalign.eval.generate import generate

    aligned = load_base_pipeline()
    aligned.load_lora_weights(run_dir / "final")
    eval_prompts, eval_seeds = heldout_eval_set(cfg.eval_prompts_per_task, cfg.eval_seeds_per_prompt, seed=cfg.seed + 1)
    texts = [p.text for p in eval_prompts]
    kw = {"num_inference_steps": cfg.num_inference_steps, "guidance_scale": cfg.guidance_scale}
    base_imgs = generate(base, texts, eval_seeds, progress="eval base", **kw)
    aligned_imgs = generate(aligned, texts, eval_seeds, progress="eval aligned", **kw)
    results = compare_images(base_imgs, aligned_imgs, eval_prompts)
    results.update({"config": asdict(cfg), "candidates": candidates_source, "labels": label_counts,
                    "seconds": time.time() - t_start,
                    "train_run": str(run_dir)})

    # 5. outputs
    (out / "results.json").write_text(json.dumps(results, indent=2))
    write_demo_report(out / "report.html", results, base_imgs, aligned_imgs, eval_prompts, run_dir / "metrics.jsonl",
                      training_config=run_dir / "config.yaml")
    return results


MIN_BOOTSTRAP_PROMPTS = 5  # fewer prompts per task: the report warns that the per-task intervals say little


def summary_rows(results: dict) -> list[dict]:
    """Per ShapesEval task, oracle utility and learned reward: base, aligned, and aligned − base with its
    95% bootstrap interval over prompts (``⚠`` when it rests on fewer than :data:`MIN_BOOTSTRAP_PROMPTS`)."""
    se = results["shapes_eval"]
    rows = [{"metric": f"ShapesEval {k}", "base": se["base"][k], "aligned": se["aligned"][k]} for k in se["base"]]
    if "oracle_utility" in results:
        rows.append({"metric": "oracle utility (mean)", **results["oracle_utility"]})
    lr = results.get("learned_reward", {})
    if "base" in lr:
        rows.append({"metric": "learned reward (shapes-clip)", "base": lr["base"], "aligned": lr["aligned"]})
    for row in rows:
        d = results.get("deltas", {}).get(row["metric"])
        if d:
            lo, hi = d["diff_ci95"]
            row["Δ aligned − base [95% CI]"] = (f"{d['mean_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
                                                + (" ⚠" if d["n_prompts"] < MIN_BOOTSTRAP_PROMPTS else ""))
    return rows


def grid_order(prompts, n: int) -> list[int]:
    """``n`` image indices spread over every task (round robin over the tasks, in first-seen order)."""
    by_task: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_task.setdefault(getattr(p, "task", ""), []).append(i)
    out: list[int] = []
    while len(out) < n and any(by_task.values()):
        for lst in by_task.values():
            if lst and len(out) < n:
                out.append(lst.pop(0))
    return out


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    """An exponential moving average (the smoothed curve over the raw one)."""
    out, m = [], None
    for v in values:
        m = v if m is None else (1 - alpha) * m + alpha * v
        out.append(m)
    return out


def training_settings(config_path: Path | None, results: dict) -> str | None:
    """The training run's key settings in one line (from its ``config.yaml``)."""
    if config_path is None or not Path(config_path).is_file():
        return None
    import yaml

    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    m, t, model = raw.get("method") or {}, raw.get("train") or {}, raw.get("model") or {}
    parts = [str(m.get("name"))]
    if "beta" in m:
        parts.append(f"β {m['beta']:g}")
    parts += [f"learning rate {float(t.get('learning_rate', 0)):g}", f"{t.get('max_steps')} steps",
              f"batch {t.get('batch_size')}×{t.get('gradient_accumulation_steps', 1)}"]
    if model.get("lora_rank"):
        parts.append(f"LoRA rank {model['lora_rank']}")
    labels = results.get("labels", {})
    if labels:
        parts.append(f"{labels.get('pairs')} oracle-labelled pairs")
    parts.append(f"seed {t.get('seed')}")
    return "Training: " + ", ".join(parts) + "."


def training_method(config_path: Path | None) -> str:
    """The trained method's name, from the run's ``config.yaml`` ("training" when there is none)."""
    if config_path is None or not Path(config_path).is_file():
        return "training"
    import yaml

    return str(((yaml.safe_load(Path(config_path).read_text()) or {}).get("method") or {}).get("name", "training"))


def write_demo_report(path: Path, results: dict, base_imgs, aligned_imgs, prompts, metrics_path: Path, *,
                      training_config: Path | None = None, max_cells: int = 48) -> Path:
    """The demo's ``report.html``: the summary (every row with aligned − base and its interval, the
    training settings, a warning when there are too few prompts per task), the training curves (raw and
    smoothed), and base/aligned pairs spread over every task, each image with its ShapesEval verdict and
    oracle utility under it. ``prompts``: ShapesPrompt objects (or captions)."""
    import html

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffalign.eval.report import (
        figure_data_uri,
        html_table,
        png_data_uri,
        write_report,
    )

    captions = [getattr(p, "text", p) for p in prompts]
    wr = results["oracle_win_rate"]
    n_prompts = len(set(captions))
    head = (f"<p>Oracle win rate of aligned over base: <b>{wr['aligned_over_base']:.3f}</b> "
            f"(95% CI {wr['ci95'][0]:.3f}–{wr['ci95'][1]:.3f}) on {results['n_images']} held-out images "
            f"({n_prompts} prompts), same seeds.</p>")
    settings = training_settings(training_config, results)
    if settings:
        head += f"<p>{html.escape(settings)}</p>"
    head += ("<p>Δ is aligned − base on the same prompt and seed; [low, high] is a 95% percentile bootstrap "
             "interval that resamples prompts (a prompt's seeds together). Numbers have 3 decimals.</p>")
    per_task = results.get("config", {}).get("eval_prompts_per_task")
    if per_task is not None and per_task < MIN_BOOTSTRAP_PROMPTS:
        head = (f"<p class='warning'>⚠ Only {per_task} prompt(s) per task: the per-task intervals (marked ⚠) are "
                f"unreliable, often zero-width; use --eval-prompts-per-task {MIN_BOOTSTRAP_PROMPTS} or more.</p>"
                + head)
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    method = training_method(training_config)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    steps = [r["step"] for r in rows]
    axes[0].plot(steps, [r["loss"] for r in rows], alpha=0.35, label="per step")
    axes[0].plot(steps, _smooth([r["loss"] for r in rows]), label="smoothed (EMA 0.1)")
    if method == "diffusion-dpo":  # its loss starts at ln 2
        axes[0].axhline(0.6931, ls="--", c="gray", lw=0.8)
    axes[0].set(title=f"{method} loss", xlabel="step")
    axes[0].legend(fontsize=8)
    if rows and "implicit_acc" in rows[0]:
        axes[1].plot(steps, [r["implicit_acc"] for r in rows], alpha=0.35)
        axes[1].plot(steps, _smooth([r["implicit_acc"] for r in rows]))
        axes[1].set(title="implicit accuracy", xlabel="step")
    plot = f"<img src='{figure_data_uri(fig)}' alt='training curves'>"
    plt.close(fig)
    per_image = results.get("per_image", {})

    def caption(name: str, i: int) -> str:
        d = per_image.get(name)
        if not d:
            return ""
        verdict = "✓" if d["correct"][i] >= 0.5 else "✗"
        return f"<span class='score'>{name}: ShapesEval {verdict} · oracle {d['utility'][i]:.3f}</span>"

    cells = []
    for i in grid_order(prompts, max_cells):
        b, a, c = base_imgs[i], aligned_imgs[i], captions[i]
        task = getattr(prompts[i], "task", None)
        cells.append(f"<figure><img width=128 src='{png_data_uri(b)}'> <img width=128 src='{png_data_uri(a)}'>"
                     f"{caption('base', i)}{caption('aligned', i)}"
                     f"<figcaption>{'[' + html.escape(task) + '] ' if task else ''}{html.escape(c)}</figcaption>"
                     "</figure>")
    grid = ("<p>Each cell: base (left) and aligned (right), same prompt and seed, drawn from every task; under "
            "them each image's ShapesEval verdict and oracle utility.</p>" + "".join(cells))
    return write_report(path, f"diffalign demo: {method} on the Shapes world", [
        ("Summary", head + html_table(summary_rows(results))),
        ("Training", plot),
        ("Base vs aligned, same seeds", grid),
    ])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig
    parser.add_argument("--output-dir", default=d.output_dir)
    parser.add_argument("--train-prompts", type=int, default=d.train_prompts, help="training prompts (one pair each)")
    parser.add_argument("--images-per-prompt", type=int, default=d.images_per_prompt,
                        help="candidates per training prompt; the pair is the oracle's best and worst")
    parser.add_argument("--sample-steps", type=int, default=d.sample_steps, help="sampler steps for the candidates")
    parser.add_argument("--eval-prompts-per-task", type=int, default=d.eval_prompts_per_task)
    parser.add_argument("--eval-steps", type=int, default=d.num_inference_steps, help="sampler steps for evaluation")
    parser.add_argument("--flip-labels", action="store_true", help="control run: train on reversed preferences")
    parser.add_argument("--candidates", default=d.candidates,
                        help="training candidates: 'bundled' (the base model's samples shipped in datasets/, after "
                             "re-sampling a spot check; used when the settings match), 'sample' (sample all: "
                             "~8 more minutes on 2 cores) or a parquet made by `diffalign shapes candidates`")
    parser.add_argument("--recipe", default=None,
                        help="the training recipe (a bundled name such as shapes-diffusion-dpo.yaml, or a path) of "
                             "a method trained on preference pairs; default: pipelines/shapes-mapo.yaml")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    cfg = DemoConfig(output_dir=args.output_dir, train_prompts=args.train_prompts,
                     images_per_prompt=args.images_per_prompt, sample_steps=args.sample_steps,
                     eval_prompts_per_task=args.eval_prompts_per_task, num_inference_steps=args.eval_steps,
                     flip_labels=args.flip_labels, seed=args.seed, candidates=args.candidates, recipe=args.recipe,
                     overrides=list(args.overrides))
    results = run_demo(cfg)
    print()
    print(f"{'metric':<34}{'base':>8}{'aligned':>9}   Δ aligned − base [95% CI]")
    for r in summary_rows(results):
        print(f"{r['metric']:<34}{r['base']:>8.3f}{r['aligned']:>9.3f}   {r.get('Δ aligned − base [95% CI]', '')}")
    wr = results["oracle_win_rate"]
    print(f"oracle win rate aligned over base: {wr['aligned_over_base']:.3f} "
          f"(95% CI {wr['ci95'][0]:.3f}-{wr['ci95'][1]:.3f}, n={results['n_images']})")
    print(f"wrote {Path(cfg.output_dir) / 'results.json'} and {Path(cfg.output_dir) / 'report.html'} "
          f"in {results['seconds'] / 60:.1f} min")
    return 0
