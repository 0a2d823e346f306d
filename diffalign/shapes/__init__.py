"""The Shapes world: a renderer of coloured-shape scenes, a GenEval-style caption grammar, an exact
evaluator (ShapesEval) and an oracle preference annotator.

Names are re-exported lazily: ``from diffalign.shapes import render`` imports only what it needs.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "scene": ("COLORS", "SHAPES", "IMAGE_SIZE", "ShapeObject", "Scene", "render", "random_background"),
    "grammar": ("TASKS", "ShapesPrompt", "sample_prompt", "prompt_set", "scene_for_prompt", "parse_prompt",
                "make_prompt", "all_prompts", "prompts_in_split", "split_of"),
    "evaluate": ("Detection", "EvalResult", "detect", "evaluate", "shapes_eval"),
    "oracle": ("Oracle", "visual_quality", "to_jpeg_bytes", "wilson_interval"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
