"""Score a generated folder (GenEval layout): rewards, the GenEval protocol, per-category summaries.

A folder is read back as a list of :class:`GeneratedImage` (prompt index, sample index, file,
prompt, category, metadata line). Scores are per image, ``{metric: [score per image]}``: one
metric per reward, plus ``geneval`` (1.0 when the GenEval protocol says the image is correct)
for prompts with GenEval metadata. Summaries and paired comparisons are computed from these.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from diffalign.eval.generate import METADATA_FILE

GENEVAL_METRIC = "geneval"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class GeneratedImage:
    """One image of a generated folder and the prompt it was made for."""

    prompt_index: int
    sample_index: int
    path: Path
    prompt: str
    category: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        """``(prompt_index, sample_index)``: the same for the same prompt and seed in any run."""
        return self.prompt_index, self.sample_index

    def group(self, breakdown: str) -> str | None:
        """The image's group for a per-category table: its ``category``, or a metadata field."""
        value = self.category if breakdown == "category" else self.metadata.get(breakdown)
        return None if value is None else str(value)


def _read_metadata(path: Path) -> dict:
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: empty; expected one JSON metadata line")
    try:
        meta = json.loads(lines[0])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line 1: not JSON ({e})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("prompt"), str):
        raise ValueError(f"{path}, line 1: expected a JSON object with a 'prompt' field")
    return meta


def read_folder(folder: str | Path, keys: Sequence[tuple[int, int]] | None = None) -> list[GeneratedImage]:
    """The images of a GenEval-layout folder, by prompt then sample index.

    ``keys``: the ``(prompt_index, sample_index)`` pairs wanted (each must exist); default: all
    images found. Each prompt folder (``00012``) needs a ``metadata.jsonl`` whose first line has
    ``prompt``; its category is ``tag`` for GenEval-format lines, else ``category``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of generated images")
    wanted = None if keys is None else {(int(i), int(j)) for i, j in keys}
    out: list[GeneratedImage] = []
    prompt_dirs = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    for pdir in prompt_dirs:
        index = int(pdir.name)
        if wanted is not None and not any(i == index for i, _ in wanted):
            continue
        meta_path = pdir / METADATA_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: missing (every prompt folder needs its metadata line)")
        meta = _read_metadata(meta_path)
        category = meta.get("tag") if "include" in meta else meta.get("category")
        samples = pdir / "samples"
        files = sorted(p for p in samples.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.stem.isdigit()) \
            if samples.is_dir() else []
        for f in files:
            item = GeneratedImage(index, int(f.stem), f, meta["prompt"], None if category is None else str(category),
                                  meta)
            if wanted is None or item.key in wanted:
                out.append(item)
    if wanted is not None:
        missing = sorted(wanted - {im.key for im in out})
        if missing:
            i, j = missing[0]
            raise FileNotFoundError(f"{folder}: {len(missing)} wanted image(s) missing, e.g. prompt {i} sample {j} "
                                    f"({i:05d}/samples/{j:04d}.png)")
    if not out:
        raise FileNotFoundError(f"{folder}: no images in GenEval layout (00000/samples/0000.png, ...)")
    return sorted(out, key=lambda im: im.key)


def _open(im: GeneratedImage) -> Image.Image:
    with Image.open(im.path) as f:
        return f.convert("RGB")


def score_images(images: Sequence[GeneratedImage], rewards: Mapping[str, object], *, batch_size: int = 16,
                 progress: str | None = "score") -> dict[str, list[float]]:
    """``{reward name: [score per image]}`` of every reward (``RewardModel.score``) on every image."""
    out: dict[str, list[float]] = {name: [] for name in rewards}
    if not rewards:
        return out
    with tqdm(total=len(images), desc=progress, unit="img", disable=progress is None) as bar:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pil = [_open(im) for im in chunk]
            prompts = [im.prompt for im in chunk]
            for name, reward in rewards.items():
                values = reward.score(pil, prompts).detach().float().cpu().tolist()
                bad = [v for v in values if not math.isfinite(v)]
                if bad:
                    raise ValueError(f"reward {name!r} gave non-finite scores on {chunk[0].path.parent.parent}")
                out[name].extend(float(v) for v in values)
            bar.update(len(chunk))
    return out


def has_geneval_metadata(images: Sequence[GeneratedImage]) -> bool:
    """True when every image's metadata is a GenEval line (``tag`` and ``include``)."""
    return bool(images) and all("include" in im.metadata and "tag" in im.metadata for im in images)


def geneval_records(images: Sequence[GeneratedImage], detector, color_classifier=None, config=None, *,
                    root: str | Path | None = None, progress: str | None = "geneval") -> list[dict]:
    """GenEval's per-image records (:func:`diffalign.eval.geneval.evaluate_image`) of every image,
    with ``filename`` relative to ``root`` and the prompt and sample index added."""
    from diffalign.eval.geneval import evaluate_image

    records = []
    for im in tqdm(images, desc=progress, unit="img", disable=progress is None):
        name = str(im.path.relative_to(root)) if root is not None else str(im.path)
        rec = evaluate_image(_open(im), im.metadata, detector, color_classifier, config, filename=name)
        records.append({**rec, "prompt_index": im.prompt_index, "sample_index": im.sample_index})
    return records


def build_detector(spec: str, *, color_weights: str | None = None, device: str = "cpu") -> tuple[Any, Any]:
    """``(detector, color_classifier)`` for a ``scoring.geneval_detector`` value other than
    ``auto``/``none``: ``shapes`` or ``transformers:<hub id or folder>`` (with GenEval's CLIP
    colour classifier, ``color_weights`` or the ``openai`` weights)."""
    from diffalign.eval.geneval import CLIPColorClassifier, ShapesDetector, TransformersDetector

    if spec == "shapes":
        return ShapesDetector(), None
    if spec.startswith("transformers:"):
        detector = TransformersDetector.from_pretrained(spec.split(":", 1)[1], device=device)
        return detector, CLIPColorClassifier.from_pretrained(color_weights, device=device)
    raise ValueError(f"unknown GenEval detector {spec!r}; use auto, none, shapes or transformers:<hub id or folder>")


def _stats(values: Sequence[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    sd = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {"mean": float(a.mean()), "std": sd, "sem": sd / math.sqrt(len(a)) if len(a) else 0.0, "n": int(len(a))}


def summarize(images: Sequence[GeneratedImage], scores: Mapping[str, Sequence[float]],
              breakdowns: Sequence[str] = ("category",)) -> dict:
    """Means of each metric overall (``metrics``: mean, std, sem, n) and per group of each breakdown
    (``by[breakdown][group] = {"n": images, metric: mean}``); groups keep first-seen order."""
    for name, values in scores.items():
        if len(values) != len(images):
            raise ValueError(f"{len(values)} {name} scores for {len(images)} images")
    out = {"n_images": len(images), "n_prompts": len({im.prompt_index for im in images}),
           "metrics": {name: _stats(v) for name, v in scores.items()}, "by": {}}
    for b in breakdowns:
        groups: dict[str, list[int]] = {}
        for k, im in enumerate(images):
            g = im.group(b)
            if g is not None:
                groups.setdefault(g, []).append(k)
        if groups:
            out["by"][b] = {g: {"n": len(idx), **{name: float(np.mean([scores[name][k] for k in idx]))
                                                  for name in scores}} for g, idx in groups.items()}
    return out


def paired(images: Sequence[GeneratedImage], scores_a: Mapping[str, Sequence[float]],
           scores_b: Mapping[str, Sequence[float]], breakdowns: Sequence[str] = ("category",), *, n_boot: int = 2000,
           seed: int = 0) -> dict:
    """:func:`~diffalign.eval.compare.compare_rewards` of A against B (same images order: same prompt
    and seed), overall (``metrics``) and per group (``by``); bootstraps resample prompts."""
    from diffalign.eval.compare import compare_rewards

    groups = [im.prompt_index for im in images]
    out = {"metrics": compare_rewards(scores_a, scores_b, n_boot=n_boot, seed=seed, groups=groups), "by": {}}
    for b in breakdowns:
        members: dict[str, list[int]] = {}
        for k, im in enumerate(images):
            g = im.group(b)
            if g is not None:
                members.setdefault(g, []).append(k)
        if members:
            out["by"][b] = {
                g: compare_rewards({n: [scores_a[n][k] for k in idx] for n in scores_a},
                                   {n: [scores_b[n][k] for k in idx] for n in scores_b},
                                   n_boot=n_boot, seed=seed, groups=[groups[k] for k in idx])
                for g, idx in members.items()}
    return out
