"""The Shapes world's exact segmenter behind the GenEval detector interface (:mod:`diffalign.eval.geneval`):
``diffalign eval --detector shapes`` scores Shapes images with the GenEval protocol itself."""

from __future__ import annotations

from diffalign.eval.geneval import Detection
from diffalign.shapes.evaluate import detect


class ShapesDetector:
    """The Shapes world's exact segmenter as a GenEval detector (ShapesEval through this protocol).

    Every object gets score 1.0 and its exact colour (so no CLIP is needed); objects come largest
    first, so "most confident first" means "largest first", as in ShapesEval."""

    name = "shapes-segmenter (non-official)"

    def detect(self, image) -> list[Detection]:
        found = sorted(detect(image), key=lambda d: -d.area)
        return [Detection(d.shape, 1.0, tuple(float(v) for v in d.bbox), None, d.color) for d in found]
