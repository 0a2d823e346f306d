"""The oracle annotator: a Pick-a-Pic-style labeller whose taste is known exactly.

Its utility of an image for a prompt is ``fidelity_weight · fidelity + quality_weight · quality``:

* fidelity: the share of the caption's claims that hold (ShapesEval's checks);
* quality in [0, 1]: mean of three visual terms a better model can improve —
  clean colour (share of object pixels that are close to their palette colour, i.e. crisp, flat
  fills), no clutter (object pixels against object plus stray foreground pixels, each stray blob
  counting at least ``STRAY_PX``) and sizeable objects (objects of at least ~10×10 pixels).

``prefer`` compares two images like a human rater (see :class:`Oracle`): a tie when utilities
differ by less than ``tie_margin``, otherwise a Bradley–Terry draw on the utility difference,
flipped with probability ``noise``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from diffalign.shapes.evaluate import Analysis, analyse, evaluate
from diffalign.shapes.grammar import ShapesPrompt, parse_prompt

GOOD_AREA = 100  # pixels at 64 px (scaled with image area): objects this large count as well sized
STRAY_PX = 20    # each stray foreground blob counts as at least this many pixels of clutter


def to_jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    """JPEG bytes of an image, as Pick-a-Pic stores its images."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def to_png_bytes(image: Image.Image) -> bytes:
    """Lossless PNG bytes of an image: how the Shapes world stores the images it labels, so a model trains
    on exactly the pixels the oracle judged (JPEG at quality 95 moves the oracle's utility of about one
    Shapes image in five by more than ``tie_margin``). Pick-a-Pic's ``jpg_*`` columns take any image bytes."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def visual_quality(image, analysis: Analysis | None = None) -> float:
    """Quality term in [0, 1]: mean of clean colour, no clutter and object size (0 with no object).

    ``analysis`` is :func:`~diffalign.shapes.evaluate.analyse`'s result for ``image`` if already known.
    """
    a = analyse(image) if analysis is None else analysis
    if not a.detections:
        return 0.0
    object_px = sum(d.area for d in a.detections)
    clean = min(1.0, float(a.core.sum()) / max(1, object_px))
    comps, n = ndimage.label(a.foreground, structure=np.ones((3, 3)))
    strays = n - len(np.unique(comps[a.objects & a.foreground]))  # foreground blobs with no object
    clutter = int((a.foreground & ~a.objects).sum()) + STRAY_PX * max(0, strays)
    uncluttered = object_px / (object_px + clutter)
    good = GOOD_AREA * a.foreground.size / 64**2
    sized = float(np.mean([min(1.0, d.area / good) for d in a.detections]))
    return (clean + uncluttered + sized) / 3


class Oracle:
    """Preference labeller over (image, prompt) pairs; deterministic for a given ``seed``.

    A label is drawn like a Bradley–Terry rater: with ``Δ = utility(img0) − utility(img1)``,
    a tie (0.5) when ``|Δ| < tie_margin``; otherwise ``img0`` wins with probability
    ``σ(Δ / temperature)`` (``temperature=0``: the better image always wins), and the result is
    then flipped with probability ``noise`` (careless clicks).

    Args:
        fidelity_weight: weight of fidelity, the share of the caption's claims that hold.
        quality_weight: weight of :func:`visual_quality` (in [0, 1]).
        noise: probability of flipping a non-tie label.
        tie_margin: utilities closer than this give a tie.
        temperature: Bradley–Terry temperature on the utility difference. The default 0.02 makes a
            fidelity gap (≥ 0.25 for one failed claim) decisive while small quality gaps stay soft.
        seed: seed of the oracle's own ``numpy`` generator.
    """

    def __init__(self, fidelity_weight: float = 1.0, quality_weight: float = 0.5, noise: float = 0.1,
                 tie_margin: float = 0.02, temperature: float = 0.02, seed: int = 0):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise must be in [0, 1], got {noise}")
        self.fidelity_weight, self.quality_weight = fidelity_weight, quality_weight
        self.noise, self.tie_margin, self.temperature = noise, tie_margin, temperature
        self.rng = np.random.default_rng(seed)

    def utility(self, image, prompt: ShapesPrompt | str) -> float:
        """``fidelity_weight · fidelity + quality_weight · quality`` of one image for ``prompt``."""
        prompt = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        a = analyse(image)
        fidelity = evaluate(image, prompt, detections=a.detections).fraction
        return self.fidelity_weight * fidelity + self.quality_weight * visual_quality(image, a)

    def label_from_utilities(self, utility_0: float, utility_1: float) -> float:
        """``label_0`` (1.0, 0.0 or 0.5 for a tie) for two images of known utilities; draws noise."""
        delta = utility_0 - utility_1
        if abs(delta) < self.tie_margin:
            return 0.5
        if self.temperature > 0:
            p0 = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, delta / self.temperature))))
            label = float(self.rng.random() < p0)
        else:
            label = float(delta > 0)
        if self.rng.random() < self.noise:
            label = 1.0 - label
        return label

    def like_from_utility(self, utility: float, threshold: float) -> bool:
        """Per-image binary feedback (KTO's data): a like when ``utility`` is above ``threshold``, then
        flipped with probability ``noise``; draws noise."""
        like = utility > threshold
        if self.rng.random() < self.noise:
            like = not like
        return bool(like)

    def prefer(self, image_0, image_1, prompt: ShapesPrompt | str) -> float:
        """``label_0``: 1.0 if ``image_0`` is preferred, 0.0 if ``image_1``, 0.5 for a tie."""
        return self.label_from_utilities(self.utility(image_0, prompt), self.utility(image_1, prompt))

    def label_pairs(self, images_0: Sequence, images_1: Sequence, prompts: Sequence) -> list[float]:
        """``label_0`` of each pair ``(images_0[i], images_1[i])`` for ``prompts[i]``."""
        if not len(images_0) == len(images_1) == len(prompts):
            raise ValueError(f"{len(images_0)} and {len(images_1)} images for {len(prompts)} prompts")
        return [self.prefer(a, b, p) for a, b, p in zip(images_0, images_1, prompts)]

    def win_rate(self, images_a: Sequence, images_b: Sequence, prompts: Sequence, *, n_boot: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
        """``(rate, ci_low, ci_high)``: how often ``a`` beats ``b`` on noise-free utility (no temperature,
        no noise; utilities closer than ``tie_margin`` tie and count ½).

        The 95% interval is :func:`~diffalign.eval.compare.paired_comparison`'s bootstrap, resampling
        prompts, so several seeds of one prompt move together and ties (which vary less than a coin
        flip) are accounted for as they are.
        """
        from diffalign.eval.compare import paired_comparison

        if not len(images_a) == len(images_b) == len(prompts):
            raise ValueError(f"{len(images_a)} and {len(images_b)} images for {len(prompts)} prompts")
        if not prompts:
            raise ValueError("no images to compare")
        diffs = [self.utility(a, p) - self.utility(b, p) for a, b, p in zip(images_a, images_b, prompts)]
        diffs = [0.0 if abs(d) < self.tie_margin else d for d in diffs]
        groups = [p if isinstance(p, str) else p.text for p in prompts]
        res = paired_comparison(diffs, [0.0] * len(diffs), groups=groups, n_boot=n_boot, seed=seed)
        lo, hi = res["win_rate_ci95"]
        return res["win_rate"], lo, hi
