"""The GenEval protocol (Ghosh et al. 2023, djghosh13/geneval) behind a detector interface.

GenEval checks each generated image against its prompt's metadata line with an object detector:

- detections per class are kept when their confidence is **over** 0.3 (0.9 for ``counting``
  prompts), most confident first, at most 16 per class; no NMS (``max_overlap = 1.0``);
- every ``include`` item needs at least ``count`` kept detections of its class; its colour and
  position are checked on the ``count`` most confident of them only;
- colour: each of those objects, masked onto a ``#999`` grey image and cropped to its box, is
  classified zero-shot by CLIP over 10 colours; at least ``count`` must have the named colour;
- position ``[relation, i]`` on item ``j``: every object of item ``j`` must be in ``relation`` to
  every object of item ``i`` (which must itself have matched), by :func:`relative_position`;
- every ``exclude`` item needs **fewer** than ``count`` kept detections (counting prompts exclude
  ``count + 1``, so the number must be exact).

The official detector is mmdet 2.x Mask2Former (Swin-S). Any other detector (a transformers
detector, the Shapes segmenter) gives numbers that are *not* comparable with published GenEval
scores; results record the detector and ``official: False``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from PIL import Image

COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES: tuple[str, ...] = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}",
                                    "a photo of a {c} object")
TASKS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
OFFICIAL_DETECTOR = "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco (mmdet 2.x)"

Box = tuple[float, float, float, float]


@dataclass
class Detection:
    """One detected object: class ``label``, confidence ``score``, ``box = (x0, y0, x1, y1)`` in
    pixels, an optional boolean ``mask`` (H×W) and an optional known ``color`` (a detector that
    knows colours exactly, such as the Shapes segmenter, fills it; otherwise CLIP decides)."""

    label: str
    score: float
    box: Box
    mask: np.ndarray | None = None
    color: str | None = None


class Detector(Protocol):
    """Anything with ``detect(image) -> list[Detection]``; ``name`` labels its results."""

    name: str

    def detect(self, image: Image.Image) -> list[Detection]: ...


class ColorClassifier(Protocol):
    """Names the colour (one of :data:`COLORS`) of each detection of class ``classname`` in ``image``."""

    def classify(self, image: Image.Image, detections: Sequence[Detection], classname: str) -> list[str]: ...


@dataclass
class GenEvalConfig:
    """GenEval's thresholds (the defaults of ``evaluate_images.py``)."""

    threshold: float = 0.3            # keep detections with score > threshold
    counting_threshold: float = 0.9   # ... > this for prompts tagged "counting"
    max_objects: int = 16             # per class, most confident first
    max_overlap: float = 1.0          # NMS IoU; 1.0 = off, as in GenEval
    position_threshold: float = 0.1   # centre offsets shrink by this × (sum of box sides)


def box_iou(a: Box, b: Box) -> float:
    """IoU of two boxes with GenEval's inclusive-pixel convention (side = x1 - x0 + 1)."""
    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))
    union = area(a) + area(b) - inter
    return inter / union if union else 0.0


def select_objects(detections: Sequence[Detection], tag: str,
                   config: GenEvalConfig | None = None) -> dict[str, list[Detection]]:
    """Detections kept per class: score over the task's threshold, most confident first (ties keep
    the detector's order), at most ``max_objects``, then greedy NMS when ``max_overlap < 1``."""
    cfg = config or GenEvalConfig()
    cut = cfg.counting_threshold if tag == "counting" else cfg.threshold
    by_class: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        if d.score > cut:
            by_class.setdefault(d.label, []).append(d)
    kept: dict[str, list[Detection]] = {}
    for label, dets in by_class.items():
        queue, out = dets[:cfg.max_objects], []
        while queue:
            best = queue.pop(0)
            out.append(best)
            if cfg.max_overlap < 1:
                queue = [d for d in queue if box_iou(best.box, d.box) < cfg.max_overlap]
        kept[label] = out
    return kept


def relative_position(a: Box, b: Box, threshold: float = 0.1) -> set[str]:
    """GenEval's relations of box ``a`` to box ``b`` ("left of", "right of", "above", "below").

    The centre offset ``a - b`` is shrunk towards 0 on each axis by ``threshold × (side of a + side
    of b)``; a relation holds when the shrunk offset on its axis exceeds half the length of the raw
    offset (image y grows downwards, so "above" is a negative dy). No relation when both shrunk
    offsets vanish.
    """
    boxes = np.asarray([a[:4], b[:4]], dtype=np.float64).reshape(2, 2, 2)
    centre_a, centre_b = boxes.mean(axis=1)
    sides = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = centre_a - centre_b
    shrunk = np.maximum(np.abs(offset) - threshold * sides.sum(axis=0), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def _colors(found: list[Detection], classname: str, image, color_classifier) -> list[str]:
    if color_classifier is not None:
        if image is None:
            raise ValueError("a colour check with a color_classifier needs the image")
        return list(color_classifier.classify(image, found, classname))
    if all(d.color is not None for d in found):
        return [d.color for d in found]  # type: ignore[misc]
    raise ValueError(f"the prompt names a colour for {classname!r}: pass image and color_classifier "
                     "(e.g. CLIPColorClassifier), or detections that carry their colour")


def evaluate_geneval(metadata: dict, detections: Sequence[Detection], image: Image.Image | None = None,
                     color_classifier: ColorClassifier | None = None,
                     config: GenEvalConfig | None = None) -> tuple[bool, str]:
    """GenEval's verdict on one image: ``(correct, reason)``, ``reason`` listing each failed check.

    ``metadata`` is a line of ``evaluation_metadata.jsonl`` (``tag``, ``include``, optional
    ``exclude``); ``detections`` are all raw detections of the image (thresholds are applied here).
    """
    cfg = config or GenEvalConfig()
    objects = select_objects(detections, metadata.get("tag", ""), cfg)
    correct, reasons = True, []
    groups: list[list[Detection] | None] = []
    for req in metadata.get("include", []):
        cls, n = req["class"], req["count"]
        found = objects.get(cls, [])[:n]
        matched = len(found) >= n
        if not matched:
            reasons.append(f"expected {cls}>={n}, found {len(found)}")
        else:
            if "color" in req:
                colors = _colors(found, cls, image, color_classifier)
                if colors.count(req["color"]) < n:
                    matched = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    reasons.append(f"expected {req['color']} {cls}>={n}, found {colors.count(req['color'])} "
                                   f"{req['color']}; and {seen}")
            if "position" in req and matched:
                relation, target = req["position"]
                if groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {relation}")
                else:
                    for obj in found:
                        for ref in groups[target]:
                            rels = relative_position(obj.box, ref.box, cfg.position_threshold)
                            if relation not in rels:
                                matched = False
                                reasons.append(f"expected {cls} {relation} target, found "
                                               f"{' and '.join(sorted(rels)) or 'no relation to'} target")
                                break
                        if not matched:
                            break
        correct = correct and matched
        groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        n_found = len(objects.get(req["class"], []))
        if n_found >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {n_found}")
    return correct, "\n".join(reasons)


def evaluate_image(image: Image.Image, metadata: dict, detector: Detector,
                   color_classifier: ColorClassifier | None = None, config: GenEvalConfig | None = None,
                   filename: str | None = None) -> dict:
    """One GenEval result record (the fields of GenEval's ``results.jsonl``, plus the detector used)."""
    detections = detector.detect(image)
    correct, reason = evaluate_geneval(metadata, detections, image, color_classifier, config)
    kept = select_objects(detections, metadata.get("tag", ""), config)
    return {
        "filename": filename, "tag": metadata.get("tag"), "prompt": metadata.get("prompt"),
        "correct": bool(correct), "reason": reason, "metadata": json.dumps(metadata),
        "details": json.dumps({k: [list(map(float, d.box)) + [float(d.score)] for d in v] for k, v in kept.items()}),
        "detector": getattr(detector, "name", type(detector).__name__),
        "official": getattr(detector, "name", None) == OFFICIAL_DETECTOR,
    }


def geneval_score(results: Sequence[dict]) -> dict:
    """GenEval's summary (``summary_scores.py``) of per-image records with ``tag`` and ``correct``.

    ``tasks``: the share of correct images per task, in order of first appearance; ``overall``: the
    mean of the task means; ``correct_images`` and ``correct_prompts`` (a prompt counts when any of
    its images is correct; prompts are told apart by ``metadata``, else ``prompt``). ``detector``
    and ``official`` say which detector produced the records (``official`` only if all are).
    """
    if not results:
        raise ValueError("no GenEval results to score")
    per_task: dict[str, list[bool]] = {}
    per_prompt: dict[str, bool] = {}
    for r in results:
        per_task.setdefault(r["tag"], []).append(bool(r["correct"]))
        key = r.get("metadata") or r.get("prompt") or str(len(per_prompt))
        key = key if isinstance(key, str) else json.dumps(key, sort_keys=True)
        per_prompt[key] = per_prompt.get(key, False) or bool(r["correct"])
    tasks = {t: float(np.mean(v)) for t, v in per_task.items()}
    detectors = sorted({str(r["detector"]) for r in results if r.get("detector")})
    return {
        "overall": float(np.mean(list(tasks.values()))),
        "tasks": tasks,
        "counts": {t: len(v) for t, v in per_task.items()},
        "n_images": len(results),
        "correct_images": float(np.mean([bool(r["correct"]) for r in results])),
        "correct_prompts": float(np.mean(list(per_prompt.values()))),
        "detector": ", ".join(detectors) or None,
        "official": bool(results) and all(r.get("official", False) for r in results),
    }


# ---- colour: CLIP zero-shot on the masked crop

class CLIPColorClassifier:
    """GenEval's colour classifier: each object is pasted through its mask onto a ``#999`` grey image
    (the whole image when it has no mask), cropped to its box and classified zero-shot over
    :data:`COLORS` with :data:`COLOR_TEMPLATES` (per colour, the mean of the normalised template
    embeddings, renormalised; argmax of image · text). GenEval used open_clip ``ViT-L-14`` with
    ``openai`` weights, which is QuickGELU: here ``ViT-L-14-quickgelu`` by name."""

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer, *, background: str = "#999",
                 device: str | torch.device = "cpu"):
        self.model = model.to(device).eval().requires_grad_(False)
        self.preprocess, self.tokenizer, self.background, self.device = preprocess, tokenizer, background, device
        self._text: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None, model_name: str = "ViT-L-14-quickgelu",
                        **kw) -> CLIPColorClassifier:
        """``weights``: ``None`` for the ``openai`` weights, an open_clip pretrained tag, a hub id as
        ``hf-hub:org/name``, or a local checkpoint file. Unavailable weights (offline) raise a
        :class:`~diffalign.rewards.loading.MissingWeightsError` saying how to place them locally."""
        import open_clip

        from diffalign.rewards.loading import missing_weights

        pretrained = "openai" if weights is None else str(weights)
        looks_local = os.sep in pretrained and not pretrained.startswith("hf-hub:")
        if looks_local and not os.path.isfile(pretrained):
            raise missing_weights(f"GenEval colour classifier (open_clip {model_name})", pretrained, None,
                                  url="open_clip's 'openai' weights", cause=FileNotFoundError(pretrained))
        try:
            if pretrained.startswith("hf-hub:"):
                model, _, preprocess = open_clip.create_model_and_transforms(pretrained)
                tokenizer = open_clip.get_tokenizer(pretrained)
            else:
                model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
                tokenizer = open_clip.get_tokenizer(model_name)
        except (RuntimeError, OSError, ValueError) as e:
            raise missing_weights(f"GenEval colour classifier (open_clip {model_name})", f"pretrained={pretrained!r}",
                                  None, url="open_clip's download of that tag (or a local checkpoint file)",
                                  cause=e) from e
        return cls(model, preprocess, tokenizer, **kw)

    @torch.no_grad()
    def text_classifier(self, classname: str) -> torch.Tensor:
        """``(D, 10)`` unit text embeddings of the colours for objects of ``classname`` (cached)."""
        if classname not in self._text:
            columns = []
            for c in COLORS:
                tokens = self.tokenizer([t.format(c=c, obj=classname) for t in COLOR_TEMPLATES]).to(self.device)
                emb = torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).mean(0)
                columns.append(emb / emb.norm())
            self._text[classname] = torch.stack(columns, dim=1)
        return self._text[classname]

    def crop(self, image: Image.Image, detection: Detection) -> Image.Image:
        """The object's masked crop, as GenEval feeds it to CLIP."""
        image = image.convert("RGB")
        if detection.mask is not None:
            mask = np.asarray(detection.mask, dtype=bool)
            if mask.shape != (image.height, image.width):
                raise ValueError(f"mask shape {mask.shape} does not match the image ({image.height}, {image.width})")
            blank = Image.new("RGB", image.size, color=self.background)
            image = Image.composite(image, blank, Image.fromarray(mask))
        return image.crop(tuple(detection.box[:4]))

    @torch.no_grad()
    def classify(self, image: Image.Image, detections: Sequence[Detection], classname: str) -> list[str]:
        if not detections:
            return []
        pixels = torch.stack([self.preprocess(self.crop(image, d)) for d in detections]).to(self.device)
        feats = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
        logits = 100.0 * feats @ self.text_classifier(classname)
        return [COLORS[i] for i in logits.argmax(dim=1).tolist()]


# ---- detectors

# names some COCO detectors use, mapped to GenEval's object_names.txt
COCO_ALIASES: dict[str, str] = {
    "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard", "hair dryer": "hair drier",
    "tvmonitor": "tv", "tv monitor": "tv", "motorbike": "motorcycle", "aeroplane": "airplane", "sofa": "couch",
    "pottedplant": "potted plant", "diningtable": "dining table", "doughnut": "donut", "cellphone": "cell phone",
}


def detections_from_post_processed(result: dict, id2label: dict[int, str],
                                   label_map: dict[str, str] | None = None) -> list[Detection]:
    """Detections from one ``post_process_object_detection`` result (``scores``, ``labels``,
    ``boxes`` in pixel ``x0, y0, x1, y1``); labels are renamed by ``label_map`` (default
    :data:`COCO_ALIASES`) to GenEval's class names."""
    names = COCO_ALIASES if label_map is None else label_map
    out = []
    for score, label, box in zip(result["scores"].tolist(), result["labels"].tolist(), result["boxes"].tolist()):
        name = str(id2label.get(int(label), label))
        out.append(Detection(names.get(name, name), float(score), tuple(float(v) for v in box)))
    return out


@dataclass
class TransformersDetector:
    """A transformers object detector (``AutoModelForObjectDetection``; no mmcv, any device).

    Boxes only, so colour crops are unmasked boxes. Not GenEval's official Mask2Former: its
    results carry ``official: False`` and are not comparable with published GenEval numbers.
    """

    model: torch.nn.Module
    processor: object
    label_map: dict[str, str] | None = None
    min_score: float = 0.0
    device: str = "cpu"
    name: str = field(default="transformers")

    @classmethod
    def from_pretrained(cls, model_id: str | os.PathLike, **kw) -> TransformersDetector:
        """Load ``model_id`` (hub id or local folder) with its image processor; a clear error offline."""
        from transformers import AutoImageProcessor, AutoModelForObjectDetection

        try:
            processor = AutoImageProcessor.from_pretrained(model_id)
            model = AutoModelForObjectDetection.from_pretrained(model_id)
        except (OSError, ValueError) as e:
            raise OSError(f"object detector {str(model_id)!r} is neither a local folder nor downloadable ({e}). "
                          f"On a machine with internet run `huggingface-cli download {model_id} --local-dir DIR`, "
                          "then pass DIR") from e
        return cls(model, processor, name=f"transformers:{model_id} (non-official)", **kw)

    def __post_init__(self):
        self.model = self.model.to(self.device).eval()

    @torch.no_grad()
    def detect(self, image: Image.Image) -> list[Detection]:
        image = image.convert("RGB")
        inputs = self.processor(images=image, return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)
        result = self.processor.post_process_object_detection(
            outputs, threshold=self.min_score, target_sizes=[(image.height, image.width)])[0]
        return detections_from_post_processed(result, self.model.config.id2label, self.label_map)
