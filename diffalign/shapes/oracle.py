"""The oracle annotator: a Pick-a-Pic-style labeller whose taste is known exactly.

Its utility of an image for a prompt is ``fidelity_weight · fidelity + quality_weight · quality``:

* fidelity: the share of the caption's claims that hold (ShapesEval's checks);
* quality in [0, 1]: mean of three visual terms a better model can improve —
  clean colour (share of object pixels that are close to their palette colour, i.e. crisp, flat
  fills), no clutter (share of foreground pixels that belong to a detected object) and sizeable
  objects (objects of at least ~10×10 pixels).

``prefer`` compares two images like a human rater: a tie when utilities differ by less than
``tie_margin``, otherwise the better one, flipped with probability ``noise``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image

from diffalign.shapes.evaluate import analyse, evaluate
from diffalign.shapes.grammar import ShapesPrompt, parse_prompt

GOOD_AREA = 100  # pixels (at 64 px images): objects this large count as well sized


def to_jpeg_bytes(image: Image.Image, quality: int = 95) -> bytes:
    """JPEG bytes of an image, as Pick-a-Pic stores its images."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def visual_quality(image) -> float:
    """Quality term in [0, 1] (0 when there is no object at all)."""
    a = analyse(image)
    if not a.detections:
        return 0.0
    object_px = sum(d.area for d in a.detections)
    clean = min(1.0, float(a.core.sum()) / max(1, object_px))
    uncluttered = min(1.0, object_px / max(1, int(a.foreground.sum())))
    sized = float(np.mean([min(1.0, d.area / GOOD_AREA) for d in a.detections]))
    return (clean + uncluttered + sized) / 3


class Oracle:
    """Preference labeller over (image, prompt); deterministic for a given ``seed``.

    Args:
        fidelity_weight, quality_weight: weights of the two utility terms.
        noise: probability of flipping a non-tie label (annotator noise).
        tie_margin: utilities closer than this give a tie (label 0.5).
        seed: seed of the noise.
    """

    def __init__(self, fidelity_weight: float = 1.0, quality_weight: float = 0.5, noise: float = 0.1,
                 tie_margin: float = 0.02, seed: int = 0):
        self.fidelity_weight, self.quality_weight = fidelity_weight, quality_weight
        self.noise, self.tie_margin = noise, tie_margin
        self.rng = np.random.default_rng(seed)

    def utility(self, image, prompt: ShapesPrompt | str) -> float:
        prompt = parse_prompt(prompt) if isinstance(prompt, str) else prompt
        return self.fidelity_weight * evaluate(image, prompt).fraction + self.quality_weight * visual_quality(image)

    def prefer(self, image_0, image_1, prompt: ShapesPrompt | str) -> float:
        """``label_0``: 1.0 if ``image_0`` is preferred, 0.0 if ``image_1``, 0.5 for a tie."""
        delta = self.utility(image_0, prompt) - self.utility(image_1, prompt)
        if abs(delta) < self.tie_margin:
            return 0.5
        label = 1.0 if delta > 0 else 0.0
        if self.rng.random() < self.noise:
            label = 1.0 - label
        return label

    def label_pairs(self, images_0: Sequence, images_1: Sequence, prompts: Sequence) -> list[float]:
        return [self.prefer(a, b, p) for a, b, p in zip(images_0, images_1, prompts)]

    def win_rate(self, images_a: Sequence, images_b: Sequence, prompts: Sequence) -> tuple[float, float, float]:
        """How often ``a`` beats ``b`` on noise-free utility (ties count ½), with a 95% normal CI."""
        if not len(images_a) == len(images_b) == len(prompts):
            raise ValueError("win_rate needs as many images of each model as prompts")
        outcomes = []
        for a, b, p in zip(images_a, images_b, prompts):
            d = self.utility(a, p) - self.utility(b, p)
            outcomes.append(0.5 if abs(d) < self.tie_margin else float(d > 0))
        x = np.asarray(outcomes)
        mean = float(x.mean())
        half = 1.96 * float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else 0.5
        return mean, max(0.0, mean - half), min(1.0, mean + half)
