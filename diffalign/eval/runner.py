"""One evaluation run: generate (resumably), score, compare, write ``results.json`` and ``report.html``.

    OUT/model/      images of the model, GenEval layout (+ generation.json, geneval_results.jsonl)
    OUT/compare/    the same for the second model of a paired run (same prompts, same seeds)
    OUT/config.yaml the resolved eval recipe
    OUT/scores.jsonl one row per image: model, prompt and sample index, file, prompt, category, scores
    OUT/results.json summaries, per-category tables, the paired comparison
    OUT/report.html  tables, image grids, histograms, win-rate bars

In a paired run the comparison is ``compare`` against ``model``: the mean of ``compare − model``
and the share of (prompt, seed) pairs where ``compare`` scores higher (ties count one half), each
with a 95 % bootstrap interval over prompts. ``--model BASE --compare-lora runs/dpo/final`` thus
reads "how much the LoRA improves on its base".
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import yaml

from diffalign.data.generated import GeneratedImage, read_folder
from diffalign.eval.config import EvalConfig, ModelSpec, training_run
from diffalign.eval.generate import (
    atomic_write_bytes,
    generate_folder,
    load_eval_pipeline,
    resolve_device,
    write_json,
)
from diffalign.eval.scoring import (
    GENEVAL_METRIC,
    build_detector,
    drop_unreadable,
    geneval_records,
    has_geneval_metadata,
    paired,
    score_images,
    summarize,
)

ROLES = ("model", "compare")


def select_prompts(items: Sequence, limit: int | None) -> list[int]:
    """Indices of the prompts to use: all, or the first ``limit`` of each category (of the whole
    set when it has no categories), in the set's order."""
    if limit is None:
        return list(range(len(items)))
    if limit < 1:
        raise ValueError(f"prompts.limit must be positive, got {limit}")
    taken: dict[str | None, int] = {}
    out = []
    for i, item in enumerate(items):
        if taken.get(item.category, 0) < limit:
            taken[item.category] = taken.get(item.category, 0) + 1
            out.append(i)
    return out


def load_prompts(cfg: EvalConfig) -> list:
    """The prompt set's items (``prompts.name`` from ``prompts.path`` or its pinned download)."""
    from diffalign.eval.prompts import load_prompt_set

    p = cfg.prompts
    return load_prompt_set(p.name, path=p.path, cache_dir=p.cache_dir, **p.options)


def _generate(spec: ModelSpec, cfg: EvalConfig, items: list, indices: list[int], folder: Path) -> dict:
    g = cfg.generation
    pipe = load_eval_pipeline(spec.pretrained, lora=spec.lora, finetuned=spec.finetuned, family=spec.family,
                              scheduler=spec.scheduler, dtype=spec.dtype, variant=spec.variant,
                              revision=spec.revision, device=g.device, allow_pickle=spec.allow_pickle)
    info = {"model": spec.pretrained, "lora": spec.lora, "finetuned": spec.finetuned, "family": spec.family,
            "variant": spec.variant, "revision": spec.revision, "device": resolve_device(g.device),
            "label": spec.label(), "prompt_set": cfg.prompts.name, "limit": cfg.prompts.limit}
    try:
        res = generate_folder(pipe, items, folder, indices=indices, images_per_prompt=g.images_per_prompt,
                              seed=g.seed, num_inference_steps=g.num_inference_steps,
                              guidance_scale=g.guidance_scale, height=g.height, width=g.width,
                              batch_size=g.batch_size, negative_prompt=g.negative_prompt, info=info,
                              progress=f"generate {spec.label()}")
    finally:
        del pipe
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return {"generated": res.generated, "skipped": res.skipped, "total": res.total, **res.record}


def _load_rewards(cfg: EvalConfig) -> dict:
    from diffalign.rewards import load_reward

    device = resolve_device(cfg.scoring.device)
    rewards = {}
    for name in cfg.scoring.rewards:
        kw = {"batch_size": cfg.scoring.batch_size, "allow_pickle": cfg.scoring.allow_pickle,
              **cfg.scoring.reward_options.get(name, {})}
        rewards[name] = load_reward(name, **kw).to(device).eval()
    return rewards


def _detector_spec(cfg: EvalConfig, images: list[GeneratedImage], notes: list[str]) -> str | None:
    spec = cfg.scoring.geneval_detector
    if spec == "none":
        return None
    if not has_geneval_metadata(images):
        if spec != "auto":
            notes.append(f"GenEval protocol not run: the prompts carry no GenEval metadata (detector {spec!r} unused)")
        return None
    if spec == "auto":
        if cfg.prompts.name == "shapes":
            return "shapes"
        notes.append("GenEval protocol not run: no detector set (scoring.geneval_detector, e.g. "
                     "transformers:PekingU/rtdetr_r50vd_coco_o365)")
        return None
    return spec


def check_rewards(names: Sequence[str]) -> None:
    """Every reward is registered (or a folder with a ``reward.yaml``, or a served ``remote:URL``): a
    :class:`~diffalign.errors.UsageError` naming the unknown ones, before any image is generated."""
    from diffalign.errors import UsageError
    from diffalign.rewards import is_reward, list_rewards

    unknown = [n for n in names if not is_reward(n)]
    if unknown:
        raise UsageError(f"unknown reward(s) {unknown} in scoring.rewards (--rewards); registered: "
                         f"{', '.join(list_rewards())}, or a folder with a reward.yaml")


def _check_models(specs) -> None:
    """Each model to sample from exists and has its weights (before anything is written or generated)."""
    from diffalign.models import check_model

    seen = set()
    for spec in specs:
        key = (spec.pretrained, spec.revision)
        if spec.images or not spec.pretrained or key in seen:
            continue
        seen.add(key)
        check_model(spec.pretrained, revision=spec.revision, allow_pickle=spec.allow_pickle)


def _warn(notes: list[str], text: str) -> None:
    """A note for results.json and the report, printed at once too."""
    import sys

    notes.append(text)
    print(f"warning: {text}", file=sys.stderr)


def _skip_unreadable(role: str, ims: list[GeneratedImage], folder: Path, notes: list[str],
                     skipped: dict[str, list[dict]]) -> list[GeneratedImage]:
    """A given folder's images that decode; the others are counted and named in ``notes`` and ``skipped``."""
    from diffalign.errors import UsageError

    good, bad = drop_unreadable(ims)
    if not bad:
        return good
    if not good:
        raise UsageError(f"{folder}: none of its {len(ims)} images decodes (first: {bad[0][0].path}: {bad[0][1]})")
    skipped[role] = [{"file": str(im.path.relative_to(folder)), "reason": why} for im, why in bad]
    _warn(notes, f"{role}: skipped {len(bad)} of {len(ims)} images that do not decode ("
          + "; ".join(f"{d['file']}: {d['reason']}" for d in skipped[role][:3])
          + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "") + ")")
    return good


def _pair(images: dict[str, list[GeneratedImage]], notes: list[str]) -> tuple[dict, dict]:
    """Both models' images on their common (prompt, sample) keys, and what had no partner (reported)."""
    keys = {role: {im.key for im in ims} for role, ims in images.items()}
    common = keys["model"] & keys["compare"]
    if not common:
        raise ValueError("the two models share no (prompt, sample) image to compare")
    unpaired = {}
    for role, other in (("model", "compare"), ("compare", "model")):
        only = sorted(keys[role] - keys[other])
        if only:
            unpaired[role] = [list(k) for k in only]
            _warn(notes, f"{len(only)} image(s) of {role} have no {other} image (missing or unreadable), so the "
                  f"comparison has {len(common)} pairs, not {len(keys[role])}: "
                  + ", ".join(f"prompt {i} sample {j}" for i, j in only[:5]) + (" ..." if len(only) > 5 else ""))
    paired_images = {role: [im for im in ims if im.key in common] for role, ims in images.items()}
    for a, b in zip(paired_images["model"], paired_images["compare"]):
        if a.prompt != b.prompt:
            raise ValueError(f"prompt {a.prompt_index} differs between the folders: {a.prompt!r} vs {b.prompt!r}")
    return paired_images, unpaired


def run_eval(cfg: EvalConfig, *, progress: bool = True) -> dict:
    """Run ``cfg`` to the end and return the results (also written to ``OUT/results.json``).

    Checked before anything is written or generated: the reward names, and that each model to sample
    from exists with its weights (:func:`~diffalign.models.check_model`). A given folder's image that
    does not decode is skipped, and a paired image without its partner leaves the comparison; both are
    counted in ``notes`` (printed, in results.json and the report) and in ``skipped`` / ``unpaired``."""
    t0 = time.time()
    check_rewards(cfg.scoring.rewards)
    out = Path(cfg.output.dir)
    specs = {"model": cfg.model}
    if (c := cfg.compare_spec()) is not None:
        specs["compare"] = c
    _check_models(specs.values())
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if c is not None:
        if c.label() == cfg.model.label():  # the report needs two names
            specs = {role: dataclasses.replace(s, name=f"{s.label()} ({role})") for role, s in specs.items()}

    # 1. images: generated (resumably) unless a folder is given
    items = indices = None
    generation: dict[str, dict] = {}
    images: dict[str, list[GeneratedImage]] = {}
    notes: list[str] = []
    skipped: dict[str, list[dict]] = {}
    unpaired: dict[str, list] = {}
    for role, spec in specs.items():
        if spec.images:
            images[role] = _skip_unreadable(role, read_folder(spec.images), Path(spec.images), notes, skipped)
            gen_file = Path(spec.images) / "generation.json"
            generation[role] = json.loads(gen_file.read_text()) if gen_file.is_file() else {"folder": spec.images}
            continue
        if items is None:
            items = load_prompts(cfg)
            indices = select_prompts(items, cfg.prompts.limit)
        folder = out / role
        generation[role] = _generate(spec, cfg, items, indices, folder)
        keys = [(i, j) for i in indices for j in range(cfg.generation.images_per_prompt)]
        images[role] = read_folder(folder, keys)
    if len(images) == 2:  # a paired comparison needs the same (prompt, seed) on both sides
        images, unpaired = _pair(images, notes)

    # 2. scores: rewards, then the GenEval protocol where the prompts carry its metadata
    rewards = _load_rewards(cfg)
    scores = {role: score_images(ims, rewards, batch_size=cfg.scoring.batch_size,
                                 progress=f"score {specs[role].label()}" if progress else None)
              for role, ims in images.items()}
    del rewards
    geneval: dict[str, dict] = {}
    detector_spec = _detector_spec(cfg, images["model"], notes)
    if detector_spec is not None:
        from diffalign.eval.geneval import geneval_score

        detector, colors = build_detector(detector_spec, color_weights=cfg.scoring.color_weights,
                                          device=resolve_device(cfg.scoring.device))
        for role, ims in images.items():
            root = Path(specs[role].images) if specs[role].images else out / role
            records = geneval_records(ims, detector, colors, root=root,
                                      progress=f"geneval {specs[role].label()}" if progress else None)
            _write_jsonl(root / "geneval_results.jsonl", records)
            geneval[role] = geneval_score(records)
            scores[role][GENEVAL_METRIC] = [1.0 if r["correct"] else 0.0 for r in records]

    # 3. summaries, the paired comparison, files
    breakdowns = cfg.scoring.breakdowns
    results = {
        "prompt_set": {"name": cfg.prompts.name, "limit": cfg.prompts.limit,
                       "n_prompts": len({im.prompt_index for im in images["model"]}),
                       "images_per_prompt": cfg.generation.images_per_prompt},
        "models": {role: {"label": specs[role].label(), "spec": {k: v for k, v in vars(specs[role]).items()},
                          "folder": role if not specs[role].images else specs[role].images,
                          "generation": generation[role], "summary": summarize(images[role], scores[role], breakdowns),
                          "geneval": geneval.get(role),
                          "training": training_run(specs[role].lora or specs[role].finetuned)}
                   for role in images},
        "rewards": _reward_info_from_cfg(cfg),
        "metrics": list(scores["model"]),
    }
    if "compare" in images:
        results["comparison"] = {
            "a": "compare", "b": "model", "a_label": specs["compare"].label(), "b_label": specs["model"].label(),
            "what": "compare minus model; win rate = share of (prompt, seed) pairs where compare scores higher "
                    "(ties 1/2); 95% bootstrap CIs over prompts",
            **paired(images["model"], scores["compare"], scores["model"], breakdowns, n_boot=cfg.scoring.n_boot)}
    if detector_spec is not None:
        first = next(iter(geneval.values()))
        results["geneval"] = {"detector": first["detector"], "official": first["official"],
                              "note": None if first["official"] else
                              "non-official detector: not comparable with published GenEval scores"}
    results["notes"] = notes
    if skipped:
        results["skipped"] = skipped
    if unpaired:
        results["unpaired"] = unpaired
    results["seconds"] = time.time() - t0
    _write_scores(out / "scores.jsonl", images, scores, specs)
    write_json(out / "results.json", results)

    from diffalign.eval.eval_report import write_eval_report

    write_eval_report(out / "report.html", results, images, scores, grid_prompts=cfg.output.grid_prompts,
                      grid_samples=cfg.output.grid_samples)
    return results


def _reward_info_from_cfg(cfg: EvalConfig) -> dict:
    from diffalign.rewards import get_card

    out = {}
    for name in cfg.scoring.rewards:
        card = get_card(name)
        out[name] = {"score": card.score, "backbone": card.backbone} if card else {}
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _write_scores(path: Path, images: dict, scores: dict, specs: dict) -> None:
    rows = []
    for role, ims in images.items():
        root = Path(specs[role].images) if specs[role].images else path.parent / role
        for k, im in enumerate(ims):
            rows.append({"model": role, "prompt_index": im.prompt_index, "sample_index": im.sample_index,
                         "file": str(im.path.relative_to(root)), "prompt": im.prompt, "category": im.category,
                         **{name: v[k] for name, v in scores[role].items()}})
    _write_jsonl(path, rows)
