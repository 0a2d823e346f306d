"""``report.html`` of an evaluation run: summary, GenEval tasks, per-category tables, plots, image grids.

Everything is embedded (images and matplotlib plots as data URIs), so the page is one file that
opens anywhere. Sections: Summary, GenEval tasks (when scored, with the detector named and
non-official detectors labelled), one table per breakdown, Score distributions (histograms),
Win rates (paired runs: bars with 95 % intervals), Images (prompts from every category, the same seed
side by side in paired runs, each image's scores and GenEval verdict under it). The Summary says what
"±" and the intervals are, warns when they rest on fewer than :data:`MIN_BOOTSTRAP_PROMPTS` prompts,
and gives the key settings of a model trained by diffalign.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from diffalign.data.generated import GeneratedImage
from diffalign.eval.report import (
    figure_data_uri,
    html_table,
    jpeg_data_uri,
    png_data_uri,
    write_report,
)
from diffalign.eval.scoring import GENEVAL_METRIC

if TYPE_CHECKING:
    from matplotlib.figure import Figure

THUMBNAIL = 256  # longest side of an image in a grid (smaller images are kept as they are, lossless)
MIN_BOOTSTRAP_PROMPTS = 5
"""Below this many prompts a bootstrap over prompts says little (with 2 prompts it is often zero-width):
the report warns and marks the rows."""
SMALL = " ⚠"  # the mark of a row whose interval rests on fewer than MIN_BOOTSTRAP_PROMPTS prompts
READING_GUIDE = ("How to read: “mean ± s.e.m.” is the mean over images ± one standard error of that mean "
                 "(sd/√n); Δ is compare − model on the same prompt and seed; every [low, high] is a 95% percentile "
                 "bootstrap interval that resamples prompts (a prompt's images together); the win rate counts ties "
                 "as one half. Numbers have 3 decimals.")


def fmt(value: float) -> str:
    """The report's one number format: 3 decimals."""
    return f"{value:.3f}"


def _fmt_ci(value: float, ci: Sequence[float]) -> str:
    return f"{value:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"


def _fmt_rate(value: float, ci: Sequence[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _mark(c: dict) -> str:
    return SMALL if c.get("n_prompts", MIN_BOOTSTRAP_PROMPTS) < MIN_BOOTSTRAP_PROMPTS else ""


def small_sample_warnings(results: dict) -> list[str]:
    """The warnings for intervals that rest on too few prompts (overall, per group of each breakdown)."""
    cmp = results.get("comparison")
    if not cmp or not results["metrics"]:
        return []
    first = results["metrics"][0]
    out = []
    n = cmp["metrics"][first]["n_prompts"]
    if n < MIN_BOOTSTRAP_PROMPTS:
        out.append(f"Only {n} prompt(s) in all: the 95% bootstrap intervals are unreliable (fewer than "
                   f"{MIN_BOOTSTRAP_PROMPTS} prompts; often zero-width). Evaluate more prompts before reading them.")
    for b, groups in cmp.get("by", {}).items():
        few = {g: c[first]["n_prompts"] for g, c in groups.items() if c[first]["n_prompts"] < MIN_BOOTSTRAP_PROMPTS}
        if few:
            out.append(f"{len(few)} of {len(groups)} {b} groups have fewer than {MIN_BOOTSTRAP_PROMPTS} prompts ("
                       + ", ".join(f"{g}: {k}" for g, k in few.items()) + f"): their intervals (marked{SMALL}) are "
                       "unreliable, often zero-width.")
    return out


def training_lines(results: dict) -> list[str]:
    """One line per model trained by diffalign: the run's key settings (from its config.yaml)."""
    lines = []
    for role, m in results["models"].items():
        t = m.get("training")
        if not t:
            continue
        parts = [str(t.get("method", "?"))]
        if "beta" in t:
            parts.append(f"β {t['beta']:g}" if isinstance(t["beta"], (int, float)) else f"β {t['beta']}")
        if "learning_rate" in t:
            parts.append(f"learning rate {float(t['learning_rate']):g}")
        steps = t.get("steps", t.get("max_steps"))
        if steps is not None:
            parts.append(f"{steps} steps")
        if "batch_size" in t:
            parts.append(f"batch {t['batch_size']}×{t.get('gradient_accumulation_steps', 1)}")
        if t.get("lora_rank"):
            parts.append(f"LoRA rank {t['lora_rank']}")
        if "data" in t:
            parts.append(f"data {t['data']}")
        if "seed" in t:
            parts.append(f"seed {t['seed']}")
        lines.append(f"{role} was trained by diffalign ({t['run']}): " + ", ".join(parts))
    return lines


def metric_label(name: str, results: dict) -> str:
    """A metric's display name (GenEval correctness says when its detector is not the official one)."""
    if name == GENEVAL_METRIC and results.get("geneval"):
        return "GenEval correct" + ("" if results["geneval"]["official"] else " (non-official)")
    return name


def summary_rows(results: dict) -> list[dict]:
    """One row per metric: each model's mean ± s.e.m., and for paired runs the difference and win rate
    with their 95% bootstrap intervals (marked when they rest on too few prompts)."""
    models = results["models"]
    cmp = results.get("comparison")
    rows = []
    for name in results["metrics"]:
        row = {"metric": metric_label(name, results)}
        for role, m in models.items():
            s = m["summary"]["metrics"][name]
            row[f"{m['label']} (mean ± s.e.m.)"] = f"{fmt(s['mean'])} ± {fmt(s['sem'])}"
        if cmp:
            c = cmp["metrics"][name]
            row["Δ compare − model [95% CI]"] = _fmt_ci(c["mean_diff"], c["diff_ci95"]) + _mark(c)
            row["win rate of compare [95% CI]"] = _fmt_rate(c["win_rate"], c["win_rate_ci95"]) + _mark(c)
        rows.append(row)
    return rows


def geneval_rows(results: dict) -> list[dict]:
    """Per GenEval task: images and each model's share of correct images; then overall and prompts."""
    models = {m["label"]: m["geneval"] for m in results["models"].values() if m.get("geneval")}
    if not models:
        return []
    first = next(iter(models.values()))
    by_task = (results.get("comparison") or {}).get("by", {}).get("category", {}) if len(models) > 1 else {}
    rows = []
    for t in first["tasks"]:
        row = {"task": t, "images": first["counts"][t], **{label: fmt(g["tasks"][t]) for label, g in models.items()}}
        if len(models) > 1:
            c = by_task.get(t, {}).get(GENEVAL_METRIC)
            row["Δ compare − model [95% CI]"] = _fmt_ci(c["mean_diff"], c["diff_ci95"]) + _mark(c) if c else "–"
        rows.append(row)
    overall = {"task": "overall (mean of tasks)", "images": first["n_images"],
               **{label: fmt(g["overall"]) for label, g in models.items()}}
    correct = {"task": "prompts with ≥1 correct image", "images": first["n_images"],
               **{label: fmt(g["correct_prompts"]) for label, g in models.items()}}
    if len(models) > 1:
        a, b = (g["overall"] for g in list(models.values())[::-1][:2])
        overall["Δ compare − model [95% CI]"] = f"{a - b:+.3f} (interval: the summary's GenEval row)"
        correct["Δ compare − model [95% CI]"] = "–"
    return rows + [overall, correct]


def breakdown_rows(results: dict, breakdown: str) -> list[dict]:
    """Per group of ``breakdown``: images, each model's mean of each metric, and (paired) the
    difference and win rate of compare."""
    models = results["models"]
    cmp = results.get("comparison")
    groups = models["model"]["summary"]["by"].get(breakdown, {})
    rows = []
    for g, stats in groups.items():
        row = {breakdown: g, "images": stats["n"]}
        if cmp and results["metrics"]:
            row["prompts"] = cmp["by"][breakdown][g][results["metrics"][0]]["n_prompts"]
        for name in results["metrics"]:
            for m in models.values():
                row[f"{name}: {m['label']}"] = fmt(m["summary"]["by"][breakdown][g][name])
            if cmp:
                c = cmp["by"][breakdown][g][name]
                row[f"{name}: Δ [95% CI]"] = _fmt_ci(c["mean_diff"], c["diff_ci95"]) + _mark(c)
                row[f"{name}: win rate [95% CI]"] = _fmt_rate(c["win_rate"], c["win_rate_ci95"]) + _mark(c)
        rows.append(row)
    return rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def histogram_figure(results: dict, scores: Mapping[str, Mapping[str, Sequence[float]]]) -> Figure:
    """One histogram per metric, the models overlaid."""
    plt = _plt()
    names = results["metrics"]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3), squeeze=False)
    for ax, name in zip(axes[0], names):
        values = [v for role in scores for v in scores[role][name]]
        lo, hi = min(values), max(values)
        bins = 2 if name == GENEVAL_METRIC else 20
        for role, per_metric in scores.items():
            ax.hist(per_metric[name], bins=bins, range=(lo, hi if hi > lo else lo + 1), alpha=0.55,
                    label=results["models"][role]["label"])
        ax.set(title=metric_label(name, results), xlabel="score", ylabel="images")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def win_rate_figure(results: dict, breakdown: str | None = None) -> Figure:
    """Win rate of compare over model per metric (and per group of ``breakdown``), with 95 % intervals."""
    import numpy as np

    plt = _plt()
    cmp = results["comparison"]
    names = results["metrics"]
    if breakdown is None:
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(names), 3))
        rates = [cmp["metrics"][n]["win_rate"] for n in names]
        cis = np.array([cmp["metrics"][n]["win_rate_ci95"] for n in names])
        ax.bar(range(len(names)), rates, yerr=[np.array(rates) - cis[:, 0], cis[:, 1] - np.array(rates)],
               capsize=4, color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set(ylim=(0, 1), ylabel="win rate", title=f"{cmp['a_label']} over {cmp['b_label']}")
        ax.axhline(0.5, ls="--", c="gray", lw=0.8)
        fig.tight_layout()
        return fig
    groups = list(cmp["by"][breakdown])
    fig, axes = plt.subplots(1, len(names), figsize=(max(4, 0.5 * len(groups) + 1.5) * len(names), 3.2),
                             squeeze=False)
    for ax, n in zip(axes[0], names):
        rates = np.array([cmp["by"][breakdown][g][n]["win_rate"] for g in groups])
        cis = np.array([cmp["by"][breakdown][g][n]["win_rate_ci95"] for g in groups])
        ax.bar(range(len(groups)), rates, yerr=[rates - cis[:, 0], cis[:, 1] - rates], capsize=3, color="tab:orange")
        ax.set_xticks(range(len(groups)), groups, rotation=35, ha="right", fontsize=8)
        ax.set(ylim=(0, 1), title=f"{n} win rate by {breakdown}")
        ax.axhline(0.5, ls="--", c="gray", lw=0.8)
    fig.tight_layout()
    return fig


def grid_prompts(images: Sequence[GeneratedImage], n: int) -> list[int]:
    """``n`` prompt indices spread over the categories (round robin, in first-seen order)."""
    by_cat: dict[str | None, list[int]] = {}
    for im in images:
        lst = by_cat.setdefault(im.category, [])
        if im.prompt_index not in lst:
            lst.append(im.prompt_index)
    out: list[int] = []
    while len(out) < n and any(by_cat.values()):
        for lst in by_cat.values():
            if lst and len(out) < n:
                out.append(lst.pop(0))
    return out


def _thumb(path: Path) -> Image.Image:
    with Image.open(path) as f:
        im = f.convert("RGB")
    if max(im.size) > THUMBNAIL:
        im.thumbnail((THUMBNAIL, THUMBNAIL), Image.Resampling.LANCZOS)
    return im


def _img_tag(grid: Image.Image, tile: int, alt: str, cls: str = "grid") -> str:
    """Small images (up to 128 px) stay lossless PNG, shown enlarged by a whole factor (crisp
    pixels); larger ones are JPEG thumbnails at their size."""
    if tile <= 128:
        uri, width = png_data_uri(grid), grid.width * max(1, 128 // tile)
    else:
        uri, width = jpeg_data_uri(grid), grid.width
    return f"<img class='{cls}' alt='{html.escape(alt)}' width={width} src='{uri}'>"


def tile_caption(values: Mapping[str, float]) -> str:
    """The line under one image: each metric's score, GenEval's verdict as ✓/✗."""
    parts = [(f"GenEval {'✓' if v >= 0.5 else '✗'}" if name == GENEVAL_METRIC else f"{name} {fmt(v)}")
             for name, v in values.items()]
    return " · ".join(parts)


def grids_html(images: Mapping[str, Sequence[GeneratedImage]], labels: Mapping[str, str], n_prompts: int,
               samples: int, scores: Mapping[str, Mapping[str, Sequence[float]]] | None = None) -> str:
    """The Images section: a figure per prompt, prompts spread over every category (round robin); one
    row per seed, one column per model, each image with its scores (and GenEval verdict) under it."""
    roles = list(images)
    per_image = {role: {im.key: {n: v[k] for n, v in (scores or {}).get(role, {}).items()}
                        for k, im in enumerate(ims)} for role, ims in images.items()}
    legend = (f"Each row is one seed; columns: {', '.join(html.escape(labels[r]) for r in roles)}."
              if len(roles) > 1 else "Each row is one seed.") + " Under each image: its scores."
    figures = []
    for p in grid_prompts(images[roles[0]], n_prompts):
        im0 = next(im for im in images[roles[0]] if im.prompt_index == p)
        columns = {role: [im for im in ims if im.prompt_index == p][:samples] for role, ims in images.items()}
        n = min(len(c) for c in columns.values())
        head = "<tr><th></th>" + "".join(f"<th>{html.escape(labels[r])}</th>" for r in roles) + "</tr>"
        body = []
        for k in range(n):
            cells = []
            for role in roles:
                im = columns[role][k]
                thumb = _thumb(im.path)
                tag = _img_tag(thumb, max(thumb.size), f"prompt {p} sample {im.sample_index} {role}", cls="tile")
                caption = tile_caption(per_image[role].get(im.key, {}))
                cells.append(f"<td>{tag}<span class='score'>{html.escape(caption)}</span></td>")
            body.append(f"<tr><th>seed {columns[roles[0]][k].sample_index}</th>{''.join(cells)}</tr>")
        cat = f" [{html.escape(im0.category)}]" if im0.category else ""
        figures.append(f"<figure><table class='tiles'>{head}{''.join(body)}</table>"
                       f"<figcaption>#{p}{cat} {html.escape(im0.prompt)}</figcaption></figure>")
    return f"<p>{legend}</p>" + "".join(figures)


def write_eval_report(path: str | Path, results: dict, images: Mapping[str, Sequence[GeneratedImage]],
                      scores: Mapping[str, Mapping[str, Sequence[float]]], *, grid_prompts: int = 12,
                      grid_samples: int = 4) -> Path:
    """Write the report of :func:`diffalign.eval.runner.run_eval`'s ``results`` (with the images and
    per-image scores it computed them from)."""
    plt = _plt()
    models = results["models"]
    gen = models["model"]["generation"].get("settings", {})
    ps = results["prompt_set"]
    intro = [f"Prompt set <b>{html.escape(str(ps['name']))}</b>: {ps['n_prompts']} prompts"
             + (f" (at most {ps['limit']} per category)" if ps.get("limit") else "")
             + f", {ps['images_per_prompt']} images per prompt."]
    if gen:
        intro.append(f"Sampling: {html.escape(str(gen.get('scheduler')))}, {gen.get('num_inference_steps')} steps, "
                     f"guidance {gen.get('guidance_scale')}, {gen.get('height')}×{gen.get('width')}, "
                     f"{html.escape(str(gen.get('dtype')))}; {html.escape(str(gen.get('seed_rule')))} "
                     f"(base seed {gen.get('base_seed')}).")
    for role, m in models.items():
        intro.append(f"{role}: <b>{html.escape(m['label'])}</b>")
    intro += [html.escape(line) for line in training_lines(results)]
    if results.get("comparison"):
        intro.append(html.escape(f"Paired comparison: {results['comparison']['what']}."))
    intro.append(html.escape(READING_GUIDE))
    if results.get("geneval") and not results["geneval"]["official"]:
        intro.append(f"<b>GenEval scored with a non-official detector ({html.escape(results['geneval']['detector'])})"
                     ": not comparable with published GenEval numbers.</b>")
    intro += [html.escape(n) for n in results.get("notes", [])]
    warnings = "".join(f"<p class='warning'>⚠ {html.escape(w)}</p>" for w in small_sample_warnings(results))
    sections = [("Summary", warnings + "".join(f"<p>{t}</p>" for t in intro) + html_table(summary_rows(results)))]
    rows = geneval_rows(results)
    if rows:
        g = results["geneval"]
        note = "" if g["official"] else ("<p>Detector not GenEval's official Mask2Former: these numbers are not "
                                         "comparable with published GenEval scores.</p>")
        sections.append((f"GenEval tasks (detector: {g['detector']})", note + html_table(rows)))
    for b in models["model"]["summary"]["by"]:
        sections.append((f"By {b}", html_table(breakdown_rows(results, b))))
    if results["metrics"]:
        fig = histogram_figure(results, scores)
        plots = f"<img class='plot' alt='score histograms' src='{figure_data_uri(fig)}'>"
        plt.close(fig)
        sections.append(("Score distributions", plots))
    if results.get("comparison") and results["metrics"]:
        fig = win_rate_figure(results)
        bars = f"<img class='plot' alt='win rates' src='{figure_data_uri(fig)}'>"
        plt.close(fig)
        for b in results["comparison"]["by"]:
            fig = win_rate_figure(results, b)
            bars += f"<br><img class='plot' alt='win rates by {html.escape(b)}' src='{figure_data_uri(fig)}'>"
            plt.close(fig)
        sections.append(("Win rates", bars))
    labels = {role: models[role]["label"] for role in images}
    sections.append(("Images", grids_html(images, labels, grid_prompts, grid_samples, scores)))
    title = "diffalign eval: " + " vs ".join(m["label"] for m in models.values())
    return write_report(path, title, sections)
